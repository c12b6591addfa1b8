"""Type stub of the compiled row masker (native/src/lib.rs); see querywarden.masking.compiled."""

from collections.abc import Callable, Sequence

class RowMasker:
    """How the columns of one result are masked: the compiled twin of RowLayout's loop."""

    def __init__(
        self,
        width: int,
        mask_all: bool,
        ops: Sequence[tuple[object, ...] | None],
        scan: Callable[[bytes], bytes | None] | None,
        hints: Sequence[bytes],
        min_digits: int | None,
        counts: object,
    ) -> None: ...
    def mask_row(self, frame: bytes, start: int, end: int) -> bytes | None: ...
    def mask_rows(self, frame: bytes, start: int, end: int) -> tuple[int, bytes | None]: ...
    def take_tally(self) -> list[int]: ...
