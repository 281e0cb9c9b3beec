"""E.164 normalisation of PBX numbers (sbc.b2bua.numbers)."""

from __future__ import annotations

import pytest

from sbc.b2bua.numbers import NumberPlan, clean, is_e164, normalise, to_e164

UK = NumberPlan(country_code="44", national_prefix="0", international_prefix="00")
NANP = NumberPlan(
    country_code="1", national_prefix="1", international_prefix="011", national_lengths=(10,)
)


@pytest.mark.parametrize(
    ("raw", "plan", "expected"),
    [
        ("+442071234567", UK, "+442071234567"),
        ("+44 (0)20 7123-4567", UK, "+442071234567"),
        ("00442071234567", UK, "+442071234567"),
        ("004915112345678", UK, "+4915112345678"),
        ("02071234567", UK, "+442071234567"),
        ("020 7123 4567", UK, "+442071234567"),
        ("(020) 7123.4567", UK, "+442071234567"),
        ("%2B442071234567", UK, "+442071234567"),
        ("02071234567;phone-context=example.com", UK, "+442071234567"),
        ("4155550100", NANP, "+14155550100"),
        ("14155550100", NANP, "+14155550100"),
        ("1 (415) 555-0100", NANP, "+14155550100"),
        ("011442071234567", NANP, "+442071234567"),
        ("+1 415 555 0100", NANP, "+14155550100"),
    ],
)
def test_to_e164_converts(raw: str, plan: NumberPlan, expected: str) -> None:
    assert to_e164(raw, plan) == expected
    assert normalise(raw, plan) == expected


@pytest.mark.parametrize(
    ("raw", "plan"),
    [
        ("101", UK),  # extension
        ("anonymous", UK),
        ("", UK),
        ("0", UK),  # national prefix alone
        ("+0441234", UK),  # country code cannot start with 0
        ("+1234567890123456", UK),  # 16 digits
        ("00", UK),
        ("5550100", NANP),  # 7-digit local number: no area code
        ("1555010", NANP),  # national prefix, wrong length
        ("02071234567", NumberPlan()),  # no country code configured
        ("12*34", UK),
    ],
)
def test_to_e164_refuses(raw: str, plan: NumberPlan) -> None:
    assert to_e164(raw, plan) is None


def test_normalise_keeps_cleaned_text_when_not_convertible() -> None:
    assert normalise("1-01", UK) == "101"
    assert normalise("anonymous", UK) == "anonymous"
    assert normalise("+0 12", UK) == "+012"


def test_clean_strips_separators_and_params() -> None:
    assert clean(" +44 (0)20-7123.4567 ") == "+442071234567"
    assert clean("0 20/7123\u00a04567;isub=1") == "02071234567"


def test_is_e164() -> None:
    assert is_e164("+14155550100")
    assert not is_e164("14155550100")
    assert not is_e164("+1")
    assert not is_e164("+0123")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"country_code": "+44"},
        {"country_code": "044"},
        {"national_prefix": "O"},
        {"international_prefix": "+"},
    ],
)
def test_plan_rejects_bad_prefixes(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        NumberPlan(**kwargs)  # type: ignore[arg-type]


def test_no_international_prefix_configured() -> None:
    plan = NumberPlan(country_code="49", national_prefix="0", international_prefix="")
    assert to_e164("030123456", plan) == "+4930123456"
    # Without an exit code "00..." is read as national: the plan decides, not a guess.
    assert to_e164("0049301234", plan) == "+49049301234"


def test_no_national_prefix_configured() -> None:
    plan = NumberPlan(country_code="39", national_prefix="", international_prefix="00")
    assert to_e164("0612345678", plan) is None
    plan = NumberPlan(country_code="39", national_prefix="", national_lengths=(10,))
    assert to_e164("0612345678", plan) == "+390612345678"
