"""Statements that try to get sensitive values past the gateway's masking.

Every statement here either runs with its sensitive values masked or is refused; the
leak test checks the bytes each client received at the socket. The shapes follow the
masking list of ../shared/design/PROTOCOL.md: aliases, expressions, casts, whole-row
references, aggregates, subqueries, CTEs, UNION, views, partitions, RETURNING, COPY,
errors that echo values, predicates that reveal values bit by bit, and dynamic SQL.
"""

from __future__ import annotations

import base64

#: Seed data: the sensitive values are the ones that must never reach an agent.
SEED = """
DROP TABLE IF EXISTS qm_customers, qm_orders, qm_people CASCADE;
CREATE TABLE qm_customers (
    id int PRIMARY KEY, name text NOT NULL, ssn text UNIQUE, card text, email text,
    api_key text, notes text
);
INSERT INTO qm_customers VALUES
    (1, 'Ada', '123-45-6789', '4111 1111 1111 1111', 'alice.secret@example.com',
     'qwk_9f8e7d6c5b4a3b2a', 'prefers email'),
    (2, 'Bob', '987-65-4321', '5500-0000-0000-0004', 'bob.hidden@example.org',
     'qwk_0a1b2c3d4e5f6a7b', 'said his SSN is 078-05-1120 on the phone');
CREATE TABLE qm_orders (id int, customer_id int, total int);
INSERT INTO qm_orders VALUES (10, 1, 100), (11, 2, 250);
CREATE VIEW qm_customer_view AS SELECT id, name, ssn FROM qm_customers;
CREATE VIEW qm_ssn_view AS SELECT id, 'x-' || ssn AS tagged FROM qm_customers;
CREATE TABLE qm_people (id int, ssn text) PARTITION BY RANGE (id);
CREATE TABLE qm_people_low PARTITION OF qm_people FOR VALUES FROM (0) TO (100);
INSERT INTO qm_people VALUES (1, '321-54-9876');
GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA public TO PUBLIC;
ANALYZE qm_customers, qm_people;
"""

#: Values that must never appear in what a masked client receives.
SECRETS = [
    "123-45-6789",
    "987-65-4321",
    "321-54-9876",
    "078-05-1120",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "alice.secret",
    "bob.hidden",
    "qwk_9f8e7d6c5b4a3b2a",
    "qwk_0a1b2c3d4e5f6a7b",
]


def leak_patterns() -> dict[bytes, str]:
    """Byte patterns of every secret: as is, digits only, upper case, hex and base64."""
    patterns: dict[bytes, str] = {}
    for secret in SECRETS:
        variants = {secret, secret.upper()}
        digits = "".join(ch for ch in secret if ch.isdigit())
        if len(digits) >= 9:
            variants.add(digits)
        for variant in variants:
            raw = variant.encode()
            patterns[raw] = secret
            patterns[raw.hex().encode()] = secret
            patterns[base64.b64encode(raw).rstrip(b"=")[:12]] = secret
    return patterns


#: Statements for the masked identity (ai-agents). Refused or masked, never leaked.
CORPUS = [
    # plain columns, aliases, quoting, qualification
    "SELECT ssn FROM qm_customers",
    "SELECT * FROM qm_customers",
    "SELECT c.* FROM qm_customers c",
    "SELECT ssn AS x, id FROM qm_customers",
    'SELECT "ssn" FROM "qm_customers"',
    "SELECT SSN FROM QM_CUSTOMERS",
    "SELECT ssn FROM public.qm_customers",
    "SELECT ssn, id FROM qm_customers WHERE id = 1",
    "SELECT ssn FROM qm_customers LIMIT 1",
    "SELECT card, email, api_key FROM qm_customers",
    # expressions, casts, functions
    "SELECT upper(ssn) FROM qm_customers",
    "SELECT ssn || '' FROM qm_customers",
    "SELECT substr(ssn, 1, 3), substr(ssn, 8) FROM qm_customers",
    "SELECT ssn::varchar(20) FROM qm_customers",
    "SELECT ssn::bytea FROM qm_customers",
    "SELECT concat(ssn, '!') FROM qm_customers",
    "SELECT format('%s', ssn) FROM qm_customers",
    "SELECT coalesce(ssn, 'none') FROM qm_customers",
    "SELECT CASE WHEN id = 1 THEN ssn END FROM qm_customers",
    "SELECT ARRAY[ssn] FROM qm_customers",
    "SELECT ROW(ssn, name) FROM qm_customers",
    "SELECT jsonb_build_object('s', ssn) FROM qm_customers",
    "SELECT encode(convert_to(ssn, 'UTF8'), 'hex') FROM qm_customers",
    "SELECT encode(convert_to(email, 'UTF8'), 'base64') FROM qm_customers",
    "SELECT lower(email), reverse(api_key) FROM qm_customers",
    "SELECT replace(card, ' ', '') FROM qm_customers",
    "SELECT translate(ssn, '-', '') FROM qm_customers",
    # whole-row references
    "SELECT c FROM qm_customers c",
    "SELECT c::text FROM qm_customers c",
    "SELECT (c).ssn FROM qm_customers c",
    "SELECT row_to_json(c) FROM qm_customers c",
    "SELECT to_jsonb(c) FROM qm_customers c",
    "SELECT json_agg(c) FROM qm_customers c",
    # aggregates
    "SELECT string_agg(ssn, ',') FROM qm_customers",
    "SELECT array_agg(ssn) FROM qm_customers",
    "SELECT json_agg(ssn) FROM qm_customers",
    "SELECT min(ssn), max(card) FROM qm_customers",
    # subqueries, CTEs, set operations, lateral
    "SELECT (SELECT ssn FROM qm_customers WHERE id = 1)",
    "SELECT x FROM (SELECT ssn AS x FROM qm_customers) s",
    "WITH t AS (SELECT ssn FROM qm_customers) SELECT * FROM t",
    "WITH t AS (SELECT upper(ssn) AS u FROM qm_customers) SELECT u FROM t",
    "SELECT ssn FROM qm_customers UNION SELECT 'x'",
    "SELECT ssn FROM qm_customers UNION ALL SELECT name FROM qm_customers",
    "SELECT name FROM qm_customers INTERSECT SELECT ssn FROM qm_customers",
    "SELECT l.s FROM qm_customers c, LATERAL (SELECT c.ssn AS s) l",
    "SELECT ssn FROM qm_customers WHERE id IN (SELECT customer_id FROM qm_orders)",
    # views and partitions
    "SELECT * FROM qm_customer_view",
    "SELECT ssn FROM qm_customer_view",
    "SELECT upper(ssn) FROM qm_customer_view",
    "SELECT tagged FROM qm_ssn_view",
    "SELECT * FROM qm_people",
    "SELECT ssn FROM qm_people_low",
    # statistics: ANALYZE's samples of every column, sensitive ones included
    "SELECT attname, histogram_bounds, most_common_vals FROM pg_stats",
    "SELECT histogram_bounds::text FROM pg_catalog.pg_stats WHERE tablename = 'qm_customers'",
    "SELECT s.* FROM pg_stats s WHERE s.tablename LIKE 'qm_%'",
    "SELECT array_to_string(histogram_bounds, ',') FROM pg_stats",
    # predicates that would reveal values bit by bit (refused)
    "SELECT id FROM qm_customers WHERE ssn LIKE '1%'",
    "SELECT id FROM qm_customers WHERE ssn = '123-45-6789'",
    "SELECT id FROM qm_customers ORDER BY ssn",
    "SELECT count(*) FROM qm_customers GROUP BY ssn",
    "SELECT c.id FROM qm_customers c JOIN qm_orders o ON o.customer_id::text = c.ssn",
    "SELECT x FROM (SELECT ssn AS x FROM qm_customers) s WHERE x LIKE '1%'",
    "SELECT id FROM qm_customers WHERE substr(ssn, 1, 1) = '1'",
    "SELECT id, sum(length(ssn)) OVER (PARTITION BY ssn) FROM qm_customers",
    "SELECT DISTINCT ON (ssn) id FROM qm_customers",
    # errors that echo values
    "SELECT ssn::int FROM qm_customers",
    "SELECT card::numeric FROM qm_customers",
    "SELECT to_date(ssn, 'YYYY') FROM qm_customers",
    # ... with quotes inside the value the error quotes (PostgreSQL does not escape them)
    "SELECT jsonb_build_object('a', api_key)::text::int FROM qm_customers",
    "SELECT ('x\"' || api_key || '\"y')::int FROM qm_customers",
    'SELECT format(\'"%s" and "%s"\', ssn, api_key)::uuid FROM qm_customers',
    "SELECT row(api_key, ssn)::text::date FROM qm_customers",
    # dynamic SQL and table readers
    "SELECT query_to_xml('SELECT ssn FROM qm_customers', true, false, '')",
    "SELECT table_to_xml('qm_customers', true, false, '')",
    # COPY
    "COPY qm_customers TO STDOUT",
    "COPY (SELECT ssn FROM qm_customers) TO STDOUT",
    "COPY (SELECT notes FROM qm_customers) TO STDOUT",
    # content detectors on unmarked columns
    "SELECT notes FROM qm_customers",
    "SELECT 'call 078-05-1120' AS note",
    "SELECT '4111 1111 1111 1111'::text AS pasted",
    # prepared statements
    "PREPARE qm_p AS SELECT ssn FROM qm_customers; EXECUTE qm_p; DEALLOCATE qm_p",
    "EXPLAIN SELECT ssn FROM qm_customers",
]

#: Statements for a masked identity allowed to update: values in errors and RETURNING.
UPDATES = [
    "UPDATE qm_customers SET name = NULL WHERE id = 1",
    "UPDATE qm_customers SET name = name WHERE id = 1 RETURNING ssn",
    "UPDATE qm_customers SET name = name WHERE id = 1 RETURNING upper(ssn), name",
    "UPDATE qm_customers SET ssn = ssn WHERE id = 1",
    "UPDATE qm_customers SET name = ssn WHERE id = 1",
]
