"""cardcore.program: a program document is checked and problems carry their line."""
from __future__ import annotations

import pytest
from cardcore import rules
from cardcore.program import (
    DEFAULT_PROGRAM_TOML,
    PROGRAM_TEXT_BYTES_MAX,
    ProgramError,
    parse_program,
)


def error_of(text: str) -> ProgramError:
    with pytest.raises(ProgramError) as info:
        parse_program(text)
    return info.value


def two_tiers(second_rate_bp: str) -> str:
    return (
        'points_per_unit = 1\n'            # 1
        '\n'                               # 2
        '[[tiers]]\n'                      # 3
        'name = "standard"\n'              # 4
        'rate_bp = 10000\n'                # 5
        '\n'                               # 6
        '[[tiers]]\n'                      # 7
        'name = "gold"\n'                  # 8
        f'rate_bp = {second_rate_bp}\n'    # 9
    )


def tiers_doc(count: int) -> str:
    """count tiers, tier k's header on line 3k + 1 (k from 0)."""
    return "".join(f'[[tiers]]\nname = "t{k}"\nrate_bp = {k + 1}\n' for k in range(count))


def test_default_document_is_the_default_program():
    assert parse_program(DEFAULT_PROGRAM_TOML) == rules.DEFAULT_PROGRAM


def test_every_default_key_has_a_comment_above_it():
    lines = DEFAULT_PROGRAM_TOML.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), line


def test_missing_keys_take_the_defaults():
    assert parse_program("") == rules.DEFAULT_PROGRAM
    assert parse_program("pin_tries_max = 5\n") == rules.Program(
        tiers=rules.DEFAULT_PROGRAM.tiers, pin_tries_max=5)


def test_syntax_error_reports_its_line_without_the_position_suffix():
    err = error_of('points_per_unit = 1\nrequire_luhn = true\npin_tries_max = \n')
    assert (err.line, err.problem) == (3, "Invalid value")


def test_unknown_top_level_key_reports_its_line():
    err = error_of('points_unit_minor = 100\n  point_per_unit = 2  # typo\n')
    assert err.line == 2
    assert err.problem.startswith("unknown key 'point_per_unit' (known: points_unit_minor, ")


def test_unknown_top_level_table_reports_its_header_line():
    err = error_of('pin_tries_max = 3\n\n[limits]\nmax = 1\n')
    assert err.line == 3
    assert err.problem.startswith("unknown key 'limits'")


def test_unknown_tier_key_reports_its_line_in_that_tier():
    doc = ('[[tiers]]\nname = "a"\nrate_bp = 100\n'
           '[[tiers]]\nname = "b"\n"rate" = 100\n')
    err = error_of(doc)
    assert err.line == 6
    assert err.problem == "tier 'b': unknown key 'rate' (known: name, rate_bp)"
    err = error_of(doc.replace('"rate" = 100', 'rate_bp = 100\n  colour = "red"'))
    assert (err.line, err.problem) == (7, "tier 'b': unknown key 'colour' (known: name, rate_bp)")


@pytest.mark.parametrize("rate_bp", ["0", "10001", "-1"])
def test_rate_out_of_range_in_second_tier_reports_its_rate_line(rate_bp):
    err = error_of(two_tiers(rate_bp))
    assert (err.line, err.problem) == (9, "tier 'gold': rate_bp must be 1..10000")


@pytest.mark.parametrize("rate_bp", [1, 10000])
def test_rate_boundaries_pass(rate_bp):
    program = parse_program(two_tiers(str(rate_bp)))
    assert program.tiers == (rules.Tier("standard", 10000), rules.Tier("gold", rate_bp))


@pytest.mark.parametrize("value, got", [("true", "a boolean"), ("3.0", "a float"),
                                        ('"3"', "a string")])
def test_integer_key_refuses_other_types(value, got):
    err = error_of(f'require_luhn = false\npin_tries_max = {value}\n')
    assert (err.line, err.problem) == (2, f"pin_tries_max must be an integer (got {got})")


def test_bool_rate_in_tier_is_refused():
    err = error_of(two_tiers("true"))
    assert (err.line, err.problem) == (9, "tier 'gold': rate_bp must be an integer (got a boolean)")


def test_boolean_key_refuses_an_integer():
    err = error_of('\nrequire_luhn = 1\n')
    assert (err.line, err.problem) == (2, "require_luhn must be a boolean (got an integer)")


def test_top_level_ranges():
    assert error_of('pin_tries_max = 16\n').problem == "pin_tries_max must be 1..15"
    assert error_of('points_unit_minor = 0\n').problem == "points_unit_minor must be 1..2**63-1"
    assert error_of('points_per_unit = -1\n').problem == "points_per_unit must be 0..2**63-1"
    program = parse_program(f'pin_tries_max = 15\npoints_per_unit = 0\n'
                            f'points_unit_minor = {2**63 - 1}\n')
    assert (program.pin_tries_max, program.points_per_unit) == (15, 0)


def test_duplicate_tier_names_report_the_second_name_line():
    doc = ('[[tiers]]\nname = "gold"\nrate_bp = 9000\n'
           '[[tiers]]\nrate_bp = 9500\nname = "gold"\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (6, "tier 2: duplicate tier name 'gold' (also tier 1)")


def test_bad_tier_names():
    err = error_of('[[tiers]]\nrate_bp = 1\nname = "a\\tb"\n')
    assert (err.line, err.problem) == (3, "tier 1: name 'a\\tb' has unprintable characters")
    err = error_of(f'[[tiers]]\nrate_bp = 1\nname = "{"x" * 33}"\n')
    assert (err.line, err.problem) == (3, "tier 1: name must be 1..32 characters")
    assert parse_program(f'[[tiers]]\nrate_bp = 1\nname = "{"x" * 32}"\n').tiers[0].name == "x" * 32


def test_seventeen_tiers_report_the_seventeenth_header_and_sixteen_pass():
    assert len(parse_program(tiers_doc(16)).tiers) == 16
    err = error_of(tiers_doc(17))
    assert (err.line, err.problem) == (49, "too many tiers: 17 (at most 16)")


def test_tier_missing_rate_reports_its_header_line():
    doc = ('[[tiers]]\nname = "a"\nrate_bp = 100\n'
           '\n'
           '[[tiers]]  # the second\nname = "b"\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (5, "tier 'b': missing rate_bp")


def test_empty_tiers_array_is_refused():
    err = error_of('pin_tries_max = 3\ntiers = []\n')
    assert (err.line, err.problem) == (2, "no tiers (a program has 1..16)")


def test_inline_tiers_report_the_tiers_line():
    doc = ('pin_tries_max = 3\n'
           'tiers = [\n'
           '  {name = "a", rate_bp = 100},\n'
           '  {name = "b", rate_bp = 0},\n'
           ']\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (2, "tier 'b': rate_bp must be 1..10000")
    ok = doc.replace("rate_bp = 0", "rate_bp = 1")
    assert parse_program(ok).tiers == (rules.Tier("a", 100), rules.Tier("b", 1))


def test_lines_inside_multiline_strings_are_not_keys():
    doc = ('[[tiers]]\nname = "a"\nrate_bp = 1\n'          # 1-3
           '[[tiers]]\nname = "b"\nrate_bp = 1\n'          # 4-6
           '[[tiers]]\n'                                   # 7
           'name = """c\\\n[[tiers]]\\\nrate_bp = 0\\\n"""\n'  # 8-11: one string
           'rate_bp = 20000\n')                            # 12
    err = error_of(doc)
    assert (err.line, err.problem) == (12, "tier 'c[[tiers]]rate_bp = 0': rate_bp must be 1..10000")


def test_earliest_problem_is_reported():
    doc = ('[[tiers]]\nname = "a"\nrate_bp = 0\n'
           '[[tiers]]\nname = 7\nrate_bp = 1\n')
    assert error_of(doc).line == 3
    assert error_of(doc.replace("rate_bp = 0", "rate_bp = 1")).line == 5


def test_document_over_the_size_limit_is_refused():
    padding = "#" * (PROGRAM_TEXT_BYTES_MAX - len(DEFAULT_PROGRAM_TOML) - 1) + "\n"
    exactly_the_limit = DEFAULT_PROGRAM_TOML + padding
    assert parse_program(exactly_the_limit) == rules.DEFAULT_PROGRAM
    err = error_of(DEFAULT_PROGRAM_TOML + "#" + padding)
    assert err.line == 0
    assert str(err) == err.problem == f"the program is longer than {PROGRAM_TEXT_BYTES_MAX} bytes"
    err = error_of("# " + "\u00e9" * (PROGRAM_TEXT_BYTES_MAX // 2))  # counted in UTF-8 bytes
    assert err.line == 0


def test_str_format():
    err = ProgramError(7, "tier 'gold': rate_bp must be 1..10000")
    assert str(err) == "line 7: tier 'gold': rate_bp must be 1..10000"
    assert isinstance(err, ValueError)
    assert str(ProgramError(0, "no tiers")) == "no tiers"
    assert str(error_of(two_tiers("0"))) == "line 9: tier 'gold': rate_bp must be 1..10000"
