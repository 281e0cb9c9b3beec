"""X- header templates (sbc.b2bua.templates)."""

from __future__ import annotations

import re

import pytest

from sbc.b2bua.templates import (
    MAX_LINE_BYTES,
    VARIABLES,
    CallFacts,
    HeaderRef,
    HeaderTemplates,
    Literal,
    Rejected,
    TemplateError,
    Variable,
    check_value,
    compile_headers,
    compile_template,
    format_now,
    render_template,
)
from sbc.sip.headers import Headers

PBX_HEADERS = Headers(
    [
        ("Via", "SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK1"),
        ("P-Asserted-Identity", '"Alice" <sip:+441234@pbx>'),
        ("X-3CX-Queue", "800"),
        ("X-Customer-Id", "C-42"),
        ("X-Customer-Tier", "gold"),
        ("x-lower", "low"),
        ("X-Bad", "a\tb"),
        ("Diversion", "<sip:100@pbx>"),
        ("Diversion", "<sip:200@pbx>"),
    ]
)


def facts(**overrides: object) -> CallFacts:
    values: dict[str, object] = {
        "caller_number": "+441234567890",
        "caller_name": "Alice Smith",
        "called": "101",
        "pbx_call_id": "abc@pbx",
        "call_uuid": "0f1e2d3c-0000-4000-8000-000000000001",
        "now": 1_795_000_000.0,
        "headers": PBX_HEADERS,
    }
    values.update(overrides)
    return CallFacts(**values)  # type: ignore[arg-type]


def test_every_variable_renders() -> None:
    for name in VARIABLES:
        template = compile_template("X-V", "{" + name + "}")
        assert template.parts == (Variable(name),)
    f = facts()
    assert render_template(compile_template("X-A", "{caller_number}"), f) == "+441234567890"
    assert render_template(compile_template("X-A", "{caller_name}"), f) == "Alice Smith"
    assert render_template(compile_template("X-A", "{called}"), f) == "101"
    assert render_template(compile_template("X-A", "{pbx_call_id}"), f) == "abc@pbx"
    assert render_template(compile_template("X-A", "{call_uuid}"), f) == f.call_uuid
    assert render_template(compile_template("X-A", "{now}"), f) == "2026-11-18T11:06:40Z"


def test_format_now_is_utc_iso8601() -> None:
    assert format_now(0.0) == "1970-01-01T00:00:00Z"
    assert format_now(1.9) == "1970-01-01T00:00:01Z"


def test_literals_escapes_and_header_reference() -> None:
    template = compile_template(
        "x-caller", "{{id}} {caller_number} via {header[p-asserted-identity]}"
    )
    assert template.header == "x-caller"
    assert template.parts == (
        Literal("{id} "),
        Variable("caller_number"),
        Literal(" via "),
        HeaderRef("P-Asserted-Identity"),
    )
    assert template.variables == ("caller_number", "header[P-Asserted-Identity]")
    rendered = render_template(template, facts())
    assert rendered == '{id} +441234567890 via "Alice" <sip:+441234@pbx>'
    assert render_template(compile_template("X-B", "a}}b"), facts()) == "a}b"


def test_header_reference_joins_lines_and_is_empty_when_absent() -> None:
    f = facts()
    assert render_template(compile_template("X-D", "{header[Diversion]}"), f) == (
        "<sip:100@pbx>, <sip:200@pbx>"
    )
    assert render_template(compile_template("X-D", "[{header[X-None]}]"), f) == "[]"


def test_variables_deduplicated_in_order() -> None:
    template = compile_template("X-T", "{called}{now}{called}{header[Foo]}{header[Foo]}")
    assert template.variables == ("called", "now", "header[Foo]")


@pytest.mark.parametrize(
    ("header", "text", "message"),
    [
        ("X-A", "{caller}", "unknown variable {caller}"),
        ("X-A", "{}", "unknown variable {}"),
        ("X-A", "{ caller_number}", "unknown variable"),
        ("X-A", "{header[]}", "bad header name"),
        ("X-A", "{header[a b]}", "bad header name"),
        ("X-A", "{caller_number", "unclosed"),
        ("X-A", "a}b", "single '}'"),
        ("X-A", "line\r\nInjected: yes", "control character U+000D"),
        ("X-A", "tab\there", "control character U+0009"),
        ("X-A", "x" * MAX_LINE_BYTES, "longer than"),
        ("From", "{caller_number}", "built by sbc itself"),
        ("f", "{caller_number}", "built by sbc itself"),
        ("call-id", "x", "built by sbc itself"),
        ("X A", "v", "not a SIP token"),
        ("X-A:", "v", "not a SIP token"),
    ],
)
def test_compile_errors(header: str, text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        compile_template(header, text)


def test_non_x_headers_may_be_templated() -> None:
    template = compile_template("subject", "Call from {caller_number}")
    assert template.header == "Subject"


def test_compile_headers_rejects_duplicates_and_bad_patterns() -> None:
    with pytest.raises(TemplateError, match="configured twice"):
        compile_headers({"X-A": "1", "x-a": "2"})
    with pytest.raises(TemplateError, match="must start with 'X-'"):
        compile_headers({}, ["P-*"])
    with pytest.raises(TemplateError, match="unknown variable"):
        compile_headers({"X-A": "{nope}"})


def test_render_table_in_order() -> None:
    table = compile_headers(
        {
            "X-Caller-Number": "{caller_number}",
            "X-Caller-Name": "{caller_name}",
            "X-Call-UUID": "{call_uuid}",
            "X-PAI": "{header[P-Asserted-Identity]}",
        }
    )
    rendered = table.render(facts())
    assert rendered.headers == (
        ("X-Caller-Number", "+441234567890"),
        ("X-Caller-Name", "Alice Smith"),
        ("X-Call-UUID", "0f1e2d3c-0000-4000-8000-000000000001"),
        ("X-PAI", '"Alice" <sip:+441234@pbx>'),
    )
    assert rendered.rejected == ()


def test_render_rejects_bad_values_per_call() -> None:
    table = compile_headers(
        {
            "X-Name": "{caller_name}",
            "X-Empty": "{header[X-Missing]}",
            "X-Long": "{caller_name}",
            "X-Ok": "fixed",
        }
    )
    rendered = table.render(facts(caller_name="Eve\x00" + "e" * 10))
    assert rendered.headers == (("X-Ok", "fixed"),)
    assert rendered.rejected[0] == Rejected("X-Name", "control character U+0000")
    assert rendered.rejected[1] == Rejected("X-Empty", "empty value")
    long = table.render(facts(caller_name="n" * 1100))
    assert ("X-Ok", "fixed") in long.headers
    assert Rejected("X-Long", "line of 1108 bytes is over 1024") in long.rejected


def test_check_value_limits() -> None:
    name = "X-Len"
    fits = "a" * (MAX_LINE_BYTES - len(name) - 2)
    assert check_value(name, fits) is None
    assert check_value(name, fits + "a") == "line of 1025 bytes is over 1024"
    # Bytes, not characters: two-byte UTF-8 characters count twice.
    assert check_value(name, "\u00e9" * 511) == "line of 1029 bytes is over 1024"
    assert check_value(name, "caf\u00e9") is None
    assert check_value(name, "a\nb") == "control character U+000A"
    assert check_value(name, "a\x7fb") == "control character U+007F"
    assert check_value(name, "a\x85b") == "control character U+0085"
    assert check_value(name, "a\u2028b") == "control character U+2028"
    assert check_value(name, "bad\udcff") == "invalid UTF-8"
    assert check_value(name, "") == "empty value"


def test_passthrough_allow_list() -> None:
    table = compile_headers({"X-Customer-Id": "templated"}, ["X-Customer-*", "x-lower", "X-Bad"])
    rendered = table.render(facts())
    # The template wins over the PBX's header of the same name; patterns are case-insensitive.
    assert rendered.headers == (
        ("X-Customer-Id", "templated"),
        ("X-Customer-Tier", "gold"),
        ("x-lower", "low"),
    )
    assert rendered.rejected == (Rejected("X-Bad", "control character U+0009"),)


def test_passthrough_never_passes_non_x_headers() -> None:
    table = HeaderTemplates((), ("*",))
    names = [name for name, _ in table.render(facts()).headers]
    assert names == ["X-3CX-Queue", "X-Customer-Id", "X-Customer-Tier", "x-lower"]


def test_no_passthrough_by_default() -> None:
    assert compile_headers({}).render(facts()).headers == ()
