"""walex.names: the one grammar for table names and patterns."""

from __future__ import annotations

import pytest

from walex.names import TablePattern, parse_pattern, parse_table_name, quote_name


@pytest.mark.parametrize(
    ("text", "schema", "table", "matches", "misses"),
    [
        ("todo", "public", "todo", [("public", "todo")], [("app", "todo"), ("public", "todos")]),
        ("app.todo", "app", "todo", [("app", "todo")], [("public", "todo")]),
        ("app:todo", "app", "todo", [("app", "todo")], []),
        ("app.*", "app", None, [("app", "x"), ("app", "y")], [("public", "x")]),
        ("*", None, None, [("a", "b"), ("public", "x")], []),
        ("*.audit", None, "audit", [("a", "audit"), ("b", "audit")], [("a", "audits")]),
        ("order_*", "public", "order_*", [("public", "order_items")], [("app", "order_items")]),
        ("app.t?", "app", "t?", [("app", "t1")], [("app", "t12")]),
        ("s*.t", "s*", "t", [("sales", "t")], [("public", "t")]),
        (
            '"Odd Table"',
            "public",
            "Odd Table",
            [("public", "Odd Table")],
            [("public", "odd table")],
        ),
        ('"my.schema"."a ""b"""', "my.schema", 'a "b"', [("my.schema", 'a "b"')], []),
        ('"a*b"', "public", "a*b", [("public", "a*b")], [("public", "aXb")]),
        ('app."t*"', "app", "t*", [("app", "t*")], [("app", "tt")]),
    ],
)
def test_patterns(
    text: str,
    schema: str | None,
    table: str | None,
    matches: list[tuple[str, str]],
    misses: list[tuple[str, str]],
) -> None:
    pattern = parse_pattern(text)
    assert (pattern.schema, pattern.table) == (schema, table)
    for s, t in matches:
        assert pattern.matches(s, t), (text, s, t)
    for s, t in misses:
        assert not pattern.matches(s, t), (text, s, t)


def test_a_pattern_reads_back_as_itself() -> None:
    for text in ["todo", "app.*", "*", "order_*", '"Odd Table"', '"my.schema"."a ""b"""', '"a*b"']:
        pattern = parse_pattern(text)
        assert parse_pattern(str(pattern)) == pattern


def test_a_bare_name_can_mean_a_schema() -> None:
    assert parse_pattern("billing", bare="schema") == TablePattern("billing", None)


@pytest.mark.parametrize("bad", ["", "  ", ".x", "a.b.c", '"unclosed', "a."])
def test_malformed_patterns_say_so(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each says its own reason
        parse_pattern(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("orders", (None, "orders")),
        ("app.orders", ("app", "orders")),
        ('"my.schema"."t"', ("my.schema", "t")),
        ('"Odd"."Name"', ("Odd", "Name")),
        ('"a*b"', (None, "a*b")),
    ],
)
def test_table_names(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_table_name(text) == expected


@pytest.mark.parametrize(("bad", "phrase"), [("order_*", "is a pattern"), ("a.b.c", "more than")])
def test_a_table_name_is_not_a_pattern(bad: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        parse_table_name(bad)


def test_quote_name() -> None:
    assert quote_name("todo") == "todo"
    assert quote_name("Todo") == '"Todo"'
    assert quote_name('a "b"') == '"a ""b"""'
