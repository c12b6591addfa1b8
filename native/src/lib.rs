//! `querywarden_native`: the DataRow masking loop of `querywarden.masking.rows`, compiled.
//!
//! `RowLayout` (pure Python, in `rows.py`) is the reference: it decides, once per result,
//! what each column needs and hands this module a list of per-column operations. This
//! module walks runs of DataRow messages and rebuilds the rows that change, calling back
//! into Python only for what it does not implement itself (keyed strategies, the content
//! detectors once a value may hold a secret). Its output must be byte for byte the
//! reference's, with the same exceptions and the same counts: `tests/unit/test_native_masking.py`
//! checks that on random and adversarial input.

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

pyo3::import_exception!(querywarden.errors, ProtocolViolation);

/// A NULL value's length field (-1).
const NULL: [u8; 4] = [0xff; 4];

/// What one column of a result needs (built once per result from Python's description).
enum Op {
    /// Copied as it is (a column before the last one that needs work).
    Pass,
    /// Every non-NULL value becomes NULL.
    Null,
    /// Every non-NULL value becomes these bytes (redact, and the constant of a type family).
    Constant(Vec<u8>),
    /// `partial` on a plain text type in UTF-8: first and last characters around a filler.
    Partial {
        first: usize,
        last: usize,
        filler: Vec<u8>,
        strip: bool,
    },
    /// `email` on a plain text type in UTF-8; a non-ASCII domain goes to `masker`, whose
    /// notion of a letter (Python's Unicode tables) this module does not copy.
    Email {
        filler: Vec<u8>,
        strip: bool,
        masker: Py<PyAny>,
    },
    /// Anything else: the Python masker of `strategies.make_masker`.
    Call(Py<PyAny>),
    /// Scanned by the content detectors; a value they flag in a document type (json,
    /// jsonb, xml) becomes what this masker gives instead of the in-place redaction.
    Scan(Option<Py<PyAny>>),
}

/// A value's replacement: NULL, or the concatenation of up to three byte strings.
enum Rep<'a> {
    Null,
    Parts(&'a [u8], &'a [u8], &'a [u8]),
    Owned(Vec<u8>),
}

/// What masking one row came to.
enum Outcome {
    Unchanged,
    /// Every value NULL (the whole row is not attributable, or does not match its layout).
    AllNull(i16),
    /// The row's count, and its edits in the edit list.
    Edited(i16),
}

/// What one call counts: the layout's per-column tally (taken from it for the call and
/// put back after), and what the session's `MaskCounts` must see, whether the call ended
/// well or not.
#[derive(Default)]
struct Stats {
    tally: Vec<u64>,
    rows: u64,
    unattributed: i64,
    unattributed_seen: bool,
}

/// How the columns of one result are masked: the compiled twin of `RowLayout`'s loop.
#[pyclass(module = "querywarden_native")]
struct RowMasker {
    width: i64,
    all: bool,
    ops: Vec<Op>,
    tally: Vec<u64>,
    scan: Option<Py<PyAny>>,
    /// The hints by their first byte: at each byte of a scanned value only the hints that
    /// start with it are compared (a value made of a byte that starts one hint costs one
    /// comparison per byte, not one per hint).
    hints_by_first: Vec<Vec<Vec<u8>>>,
    min_digits: Option<usize>,
    counts: Py<PyAny>,
}

fn truncated(column: usize) -> PyErr {
    ProtocolViolation::new_err(format!(
        "insufficient data left in message: DataRow ends inside its column {column}"
    ))
}

fn be_i32(data: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fn be_i16(data: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([data[at], data[at + 1]])
}

/// A length as the wire's signed 32-bit field (Python's struct would refuse a larger one).
fn wire_length(length: usize) -> PyResult<[u8; 4]> {
    i32::try_from(length)
        .map(i32::to_be_bytes)
        .map_err(|_| PyOverflowError::new_err("DataRow length out of range"))
}

fn strip_blanks(value: &[u8], strip: bool) -> &[u8] {
    if !strip {
        return value;
    }
    let mut end = value.len();
    while end > 0 && value[end - 1] == b' ' {
        end -= 1;
    }
    &value[..end]
}

/// Byte offset of character `index` of `text` (its length past the last character).
fn char_offset(text: &str, ascii: bool, index: usize) -> usize {
    if ascii {
        return index.min(text.len());
    }
    text.char_indices()
        .nth(index)
        .map_or(text.len(), |(offset, _)| offset)
}

/// `strategies._partial` on the value's UTF-8 text; undecodable text gets the filler.
fn partial<'a>(
    value: &'a [u8],
    first: usize,
    last: usize,
    filler: &'a [u8],
    strip: bool,
) -> Rep<'a> {
    let bytes = strip_blanks(value, strip);
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Rep::Parts(filler, b"", b"");
    };
    let ascii = bytes.is_ascii();
    let length = if ascii {
        bytes.len()
    } else {
        text.chars().count()
    };
    let kept = first.saturating_add(last);
    if kept == 0 || length < kept.saturating_mul(2) {
        return Rep::Parts(filler, b"", b"");
    }
    let head = char_offset(text, ascii, first);
    let tail = char_offset(text, ascii, length - last);
    Rep::Parts(&bytes[..head], filler, &bytes[tail..])
}

/// `strategies._plain_host` for an ASCII domain: letters, digits, '.' and '-', starting and
/// ending with a letter or digit.
fn plain_ascii_host(domain: &[u8]) -> bool {
    match (domain.first(), domain.last()) {
        (Some(first), Some(last)) => {
            domain.len() <= 253
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && domain
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
        }
        _ => false,
    }
}

/// `strategies._email`, or None when the domain is not ASCII (Python decides those).
fn email<'a>(value: &'a [u8], filler: &'a [u8], strip: bool) -> Option<Rep<'a>> {
    let bytes = strip_blanks(value, strip);
    if std::str::from_utf8(bytes).is_err() {
        return Some(Rep::Parts(filler, b"", b""));
    }
    // '@' is ASCII: in UTF-8 its byte is never part of another character.
    let Some(at) = bytes.iter().rposition(|b| *b == b'@') else {
        return Some(Rep::Parts(filler, b"", b""));
    };
    let domain = &bytes[at + 1..];
    if !domain.is_ascii() {
        return None;
    }
    if plain_ascii_host(domain) {
        Some(Rep::Parts(filler, b"@", domain))
    } else {
        Some(Rep::Parts(filler, b"", b""))
    }
}

/// A Python masker's answer (bytes, or None for NULL) as a replacement.
fn from_python<'a>(answer: &Bound<'_, PyAny>) -> PyResult<Rep<'a>> {
    if answer.is_none() {
        return Ok(Rep::Null);
    }
    let bytes = answer
        .cast::<PyBytes>()
        .map_err(|_| PyTypeError::new_err("a masker must return bytes or None"))?;
    Ok(Rep::Owned(bytes.as_bytes().to_vec()))
}

fn parse_op(op: &Bound<'_, PyAny>) -> PyResult<Op> {
    if op.is_none() {
        return Ok(Op::Pass);
    }
    let op = op.cast::<PyTuple>()?;
    let kind: String = op.get_item(0)?.extract()?;
    let item = |index: usize| op.get_item(index);
    Ok(match kind.as_str() {
        "null" => Op::Null,
        "constant" => Op::Constant(item(1)?.extract()?),
        "partial" => Op::Partial {
            first: item(1)?.extract()?,
            last: item(2)?.extract()?,
            filler: item(3)?.extract()?,
            strip: item(4)?.extract()?,
        },
        "email" => Op::Email {
            filler: item(1)?.extract()?,
            strip: item(2)?.extract()?,
            masker: item(3)?.unbind(),
        },
        "call" => Op::Call(item(1)?.unbind()),
        "scan" => {
            let document = item(1)?;
            Op::Scan((!document.is_none()).then(|| document.unbind()))
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown column operation {other:?}"
            )))
        }
    })
}

impl RowMasker {
    /// Whether a detector could match in `value` (else the scan would find nothing):
    /// enough ASCII digits for a digit-run detector, or one of the detectors' literal hints.
    /// The hints and the digit count are those of `ContentScanner.prefilter`; every match of
    /// every detector contains one of them, so a value without any cannot be flagged.
    fn may_match(&self, value: &[u8]) -> bool {
        if let Some(needed) = self.min_digits {
            if value.iter().filter(|b| b.is_ascii_digit()).count() >= needed {
                return true;
            }
        }
        value.iter().enumerate().any(|(at, byte)| {
            self.hints_by_first[usize::from(*byte)]
                .iter()
                .any(|hint| value[at..].starts_with(hint))
        })
    }

    /// Mask the DataRow at `data[start..end]`: `RowLayout.mask_row`'s loop, with the row's
    /// replacements left in `edits` (positions of the value's length field and value end).
    fn mask_one<'a>(
        &'a self,
        py: Python<'_>,
        data: &'a [u8],
        start: usize,
        end: usize,
        edits: &mut Vec<(usize, usize, Rep<'a>)>,
        stats: &mut Stats,
    ) -> PyResult<Outcome> {
        edits.clear();
        if end - start < 7 {
            return Err(ProtocolViolation::new_err(
                "insufficient data left in message: DataRow",
            ));
        }
        let count = be_i16(data, start + 5);
        if self.all {
            stats.unattributed += i64::from(count);
            stats.unattributed_seen = true;
            return Ok(Outcome::AllNull(count));
        }
        if i64::from(count) != self.width {
            return Ok(Outcome::AllNull(count));
        }
        let mut pos = start + 7;
        for (index, op) in self.ops.iter().enumerate() {
            if pos + 4 > end {
                return Err(truncated(index + 1));
            }
            let length = be_i32(data, pos);
            if length < 0 {
                pos += 4; // NULL stays NULL
                continue;
            }
            let value_end = pos + 4 + length as usize;
            if value_end > end {
                return Err(truncated(index + 1));
            }
            let value = &data[pos + 4..value_end];
            let replacement = match op {
                Op::Pass => None,
                Op::Scan(document) => {
                    if value.is_empty() || !self.may_match(value) {
                        None
                    } else {
                        let scan = self.scan.as_ref().ok_or_else(|| {
                            PyValueError::new_err("a scanned column needs a scanner")
                        })?;
                        let wire = PyBytes::new(py, value);
                        let found = scan.bind(py).call1((&wire,))?;
                        if found.is_none() {
                            None
                        } else {
                            Some(match document {
                                None => from_python(&found)?,
                                Some(document) => from_python(&document.bind(py).call1((&wire,))?)?,
                            })
                        }
                    }
                }
                Op::Null => Some(Rep::Null),
                Op::Constant(constant) => Some(Rep::Parts(constant, b"", b"")),
                Op::Partial {
                    first,
                    last,
                    filler,
                    strip,
                } => Some(partial(value, *first, *last, filler, *strip)),
                Op::Email {
                    filler,
                    strip,
                    masker,
                } => Some(match email(value, filler, *strip) {
                    Some(rep) => rep,
                    None => from_python(&masker.bind(py).call1((PyBytes::new(py, value),))?)?,
                }),
                Op::Call(masker) => Some(from_python(
                    &masker.bind(py).call1((PyBytes::new(py, value),))?,
                )?),
            };
            if let Some(replacement) = replacement {
                if !matches!(op, Op::Scan(_)) {
                    // As the reference: a masker's value counts once the masker returned.
                    stats.tally[index] += 1;
                }
                edits.push((pos, value_end, replacement));
            }
            pos = value_end;
        }
        Ok(if edits.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Edited(count)
        })
    }

    /// Append the row that `outcome` describes to `out`.
    fn write_row(
        out: &mut Vec<u8>,
        data: &[u8],
        start: usize,
        end: usize,
        outcome: &Outcome,
        edits: &[(usize, usize, Rep<'_>)],
    ) -> PyResult<()> {
        match *outcome {
            Outcome::Unchanged => out.extend_from_slice(&data[start..end]),
            Outcome::AllNull(count) => {
                let nulls = usize::try_from(count).unwrap_or(0);
                out.push(b'D');
                out.extend_from_slice(&wire_length(6 + 4 * nulls)?);
                out.extend_from_slice(&count.to_be_bytes());
                for _ in 0..nulls {
                    out.extend_from_slice(&NULL);
                }
            }
            Outcome::Edited(count) => {
                out.push(b'D');
                let length_at = out.len();
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&count.to_be_bytes());
                let mut done = start + 7;
                for (pos, value_end, replacement) in edits {
                    out.extend_from_slice(&data[done..*pos]);
                    match replacement {
                        Rep::Null => out.extend_from_slice(&NULL),
                        Rep::Parts(a, b, c) => {
                            out.extend_from_slice(&wire_length(a.len() + b.len() + c.len())?);
                            out.extend_from_slice(a);
                            out.extend_from_slice(b);
                            out.extend_from_slice(c);
                        }
                        Rep::Owned(bytes) => {
                            out.extend_from_slice(&wire_length(bytes.len())?);
                            out.extend_from_slice(bytes);
                        }
                    }
                    done = *value_end;
                }
                out.extend_from_slice(&data[done..end]);
                let length = wire_length(out.len() - length_at)?;
                out[length_at..length_at + 4].copy_from_slice(&length);
            }
        }
        Ok(())
    }

    /// Hand the counts of a call to the session's `MaskCounts` (also when the call failed,
    /// as the reference counts each row as it goes).
    fn settle(&mut self, py: Python<'_>, stats: &mut Stats) -> PyResult<()> {
        self.tally = std::mem::take(&mut stats.tally);
        let counts = self.counts.bind(py);
        if stats.rows > 0 {
            let rows = counts.getattr("rows")?.add(stats.rows)?;
            counts.setattr("rows", rows)?;
        }
        if stats.unattributed_seen {
            let values = counts.getattr("values")?;
            let key = "(unattributed)";
            let total = values.get_item(key)?.add(stats.unattributed)?;
            values.set_item(key, total)?;
        }
        Ok(())
    }

    fn begin(&mut self) -> Stats {
        Stats {
            tally: std::mem::take(&mut self.tally),
            ..Stats::default()
        }
    }

    fn check_bounds(data: &[u8], start: usize, end: usize) -> PyResult<()> {
        if start > end || end > data.len() {
            return Err(PyValueError::new_err(
                "start and end must lie within the frame",
            ));
        }
        Ok(())
    }

    fn run_rows(
        &self,
        py: Python<'_>,
        data: &[u8],
        start: usize,
        end: usize,
        stats: &mut Stats,
    ) -> PyResult<(usize, Option<Vec<u8>>)> {
        let mut edits = Vec::new();
        let mut out: Option<Vec<u8>> = None;
        let mut pos = start;
        let mut copied = start; // data[copied..pos] is not in `out` yet
        while end - pos >= 5 && data[pos] == b'D' {
            let length = be_i32(data, pos + 1);
            if length < 4 {
                break; // the caller's framing reports it
            }
            let row_end = pos + 1 + length as usize;
            if row_end > end {
                break; // not whole yet
            }
            let outcome = self.mask_one(py, data, pos, row_end, &mut edits, stats)?;
            if !matches!(outcome, Outcome::Unchanged) {
                // Sized for the run: a masked run is about as long as the original.
                let buffer = out.get_or_insert_with(|| Vec::with_capacity(end - start + 64));
                buffer.extend_from_slice(&data[copied..pos]);
                Self::write_row(buffer, data, pos, row_end, &outcome, &edits)?;
                if matches!(outcome, Outcome::Edited(_)) {
                    stats.rows += 1;
                }
                copied = row_end;
            }
            pos = row_end;
        }
        if let Some(buffer) = out.as_mut() {
            buffer.extend_from_slice(&data[copied..pos]);
        }
        Ok((pos, out))
    }
}

#[pymethods]
impl RowMasker {
    /// `ops`: one entry per column up to the last one that needs work (None: copied);
    /// `scan`: the layout's detector callback; `hints` and `min_digits`: its prefilter;
    /// `counts`: the session's MaskCounts.
    #[new]
    #[pyo3(signature = (width, mask_all, ops, scan, hints, min_digits, counts))]
    fn new(
        width: i64,
        mask_all: bool,
        ops: Vec<Bound<'_, PyAny>>,
        scan: Option<Py<PyAny>>,
        hints: Vec<Vec<u8>>,
        min_digits: Option<usize>,
        counts: Py<PyAny>,
    ) -> PyResult<Self> {
        let ops = ops.iter().map(parse_op).collect::<PyResult<Vec<_>>>()?;
        if hints.iter().any(Vec::is_empty) {
            return Err(PyValueError::new_err("a detector hint must not be empty"));
        }
        let mut hints_by_first: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 256];
        for hint in hints {
            hints_by_first[usize::from(hint[0])].push(hint);
        }
        Ok(Self {
            width,
            all: mask_all,
            tally: vec![0; ops.len()],
            ops,
            scan,
            hints_by_first,
            min_digits,
            counts,
        })
    }

    /// The DataRow at `frame[start:end]` masked, or None if nothing changed.
    fn mask_row<'py>(
        &mut self,
        py: Python<'py>,
        frame: &Bound<'py, PyBytes>,
        start: usize,
        end: usize,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let data = frame.as_bytes();
        Self::check_bounds(data, start, end)?;
        let mut stats = self.begin();
        let mut edits = Vec::new();
        let result = self
            .mask_one(py, data, start, end, &mut edits, &mut stats)
            .and_then(|outcome| {
                if matches!(outcome, Outcome::Unchanged) {
                    return Ok(None);
                }
                if matches!(outcome, Outcome::Edited(_)) {
                    stats.rows += 1;
                }
                let mut out = Vec::with_capacity(end - start + 64);
                Self::write_row(&mut out, data, start, end, &outcome, &edits)?;
                Ok(Some(PyBytes::new(py, &out)))
            });
        drop(edits);
        let settled = self.settle(py, &mut stats);
        let masked = result?;
        settled?;
        Ok(masked)
    }

    /// Mask the run of whole DataRows from `start`, up to the first message in
    /// `frame[start:end]` that is not one: (where the run stopped, the run's masked bytes
    /// or None if no row changed).
    fn mask_rows<'py>(
        &mut self,
        py: Python<'py>,
        frame: &Bound<'py, PyBytes>,
        start: usize,
        end: usize,
    ) -> PyResult<(usize, Option<Bound<'py, PyBytes>>)> {
        let data = frame.as_bytes();
        Self::check_bounds(data, start, end)?;
        let mut stats = self.begin();
        let result = self.run_rows(py, data, start, end, &mut stats);
        let settled = self.settle(py, &mut stats);
        let (stop, out) = result?;
        settled?;
        Ok((stop, out.map(|bytes| PyBytes::new(py, &bytes))))
    }

    /// The values each column's masker replaced since the last call (then reset).
    fn take_tally(&mut self) -> Vec<u64> {
        let taken = self.tally.clone();
        self.tally.iter_mut().for_each(|n| *n = 0);
        taken
    }
}

#[pymodule]
mod querywarden_native {
    #[pymodule_export]
    use super::RowMasker;
}
