"""cardcore.program: a program document is checked and problems carry their line."""
from __future__ import annotations

import array
import datetime
import pathlib

import pytest
from cardcore import layout as L
from cardcore import rules
from cardcore.program import (
    DEFAULT_PROGRAM_TOML,
    PROGRAM_TEXT_BYTES_MAX,
    ProgramError,
    parse_program,
)

TIER_KEYS = ("name, rate_bp, points_per_unit, upgrade_spend_minor, upgrade_top_up_minor, "
             "category_rate_bp, category_points_per_unit")


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
    assert err.problem == f"tier 'b': unknown key 'rate' (known: {TIER_KEYS})"
    err = error_of(doc.replace('"rate" = 100', 'rate_bp = 100\n  colour = "red"'))
    assert (err.line, err.problem) == (7, f"tier 'b': unknown key 'colour' (known: {TIER_KEYS})")


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


@pytest.mark.parametrize("days, problem", [
    (6, "tier_review_days must be 0 (no review) or 7..3660"),
    (3661, "tier_review_days must be 0..3660"),
    (-1, "tier_review_days must be 0..3660"),
])
def test_tier_review_days_refusals(days, problem):
    err = error_of(f'pin_tries_max = 3\ntier_review_days = {days}\n')
    assert (err.line, err.problem) == (2, problem)


@pytest.mark.parametrize("days", [0, 7, 365, 3660])
def test_tier_review_days_edges_are_accepted(days):
    assert parse_program(f'tier_review_days = {days}\n').tier_review_days == days


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


# --- spend order, redemption, categories, tier extras, promotions ---------------------------

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "programs"
UTC = datetime.UTC

CATEGORIES = ('[[categories]]\n'        # 1
              'code = 1\n'              # 2
              'name = "drinks"\n'       # 3
              '[[categories]]\n'        # 4
              'code = 5\n'              # 5
              'name = "tobacco"\n'      # 6
              'discountable = false\n'  # 7
              '[[tiers]]\n'             # 8
              'name = "standard"\n'     # 9
              'rate_bp = 10000\n')      # 10


def promotion(**changes: str | None) -> str:
    """A [[promotions]] table (header on its first line, then one key a line in this order:
    id, name, kind, min_top_up_minor, bonus_minor, then the changed or added keys). Values
    are TOML text; None leaves a key out."""
    keys = {"id": "3", "name": '"top up 100 get 10"', "kind": '"fixed"',
            "min_top_up_minor": "10000", "bonus_minor": "1000", **changes}
    return "[[promotions]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


def categories_doc(count: int) -> str:
    """count categories, the k-th (from 0) with its header on line 3k + 1 and code k % 63 + 1."""
    return "".join(f'[[categories]]\ncode = {k % 63 + 1}\nname = "c{k}"\n' for k in range(count))


def test_a_document_with_every_new_key_parses_to_its_program():
    doc = ('spend_order = "bonus_first"\n'
           '[redemption]\npoints = 100\nvalue_minor = 100\ncap_bp = 5000\n'
           '[[categories]]\ncode = 7\nname = "drinks"\n'
           '[[categories]]\ncode = 2\nname = "merch"\ndiscountable = false\n'
           '[[tiers]]\nname = "standard"\nrate_bp = 10000\n'
           '[[tiers]]\nname = "gold"\nrate_bp = 9000\npoints_per_unit = 2\n'
           'upgrade_spend_minor = 300000\nupgrade_top_up_minor = 100000\n'
           'category_points_per_unit = { merch = 0, drinks = 3 }\n'
           '[tiers.category_rate_bp]\ndrinks = 8500\n'
           + promotion(per_card_limit="1")
           + promotion(id="4", kind='"percent"', bonus_minor=None, bonus_bp="1000",
                       max_bonus_minor="5000", starts="2026-12-24T00:00:00+08:00",
                       ends="2026-12-28T00:00:00+08:00")
           + promotion(id="65535", kind='"first_top_up"', min_top_up_minor="1"))
    christmas = int(datetime.datetime(2026, 12, 23, 16, tzinfo=UTC).timestamp()) * 10**6
    assert parse_program(doc) == rules.Program(
        tiers=(rules.Tier("standard", 10000),
               rules.Tier("gold", 9000, 2, 300000, 100000, ((7, 8500),), ((2, 0), (7, 3)))),
        categories=(rules.Category(7, "drinks"), rules.Category(2, "merch", False)),
        promotions=(
            rules.Promotion(3, "top up 100 get 10", L.PROMO_FIXED, 10000, 1000, per_card_limit=1),
            rules.Promotion(4, "top up 100 get 10", L.PROMO_PERCENT, 10000, bonus_bp=1000,
                            max_bonus_minor=5000, starts_us=christmas,
                            ends_us=christmas + 4 * 86400 * 10**6),
            rules.Promotion(65535, "top up 100 get 10", L.PROMO_FIRST_TOP_UP, 1, 1000)),
        spend_order=L.SPEND_BONUS_FIRST, redeem_points=100, redeem_value_minor=100,
        redeem_cap_bp=5000)


def test_an_old_document_keeps_its_program():
    program = parse_program(two_tiers("9000"))
    assert (program.categories, program.promotions, program.spend_order) == \
        ((), (), L.SPEND_PRINCIPAL_FIRST)
    assert (program.redeem_points, program.redeem_value_minor, program.redeem_cap_bp) == \
        (0, 0, 10000)
    assert program.tiers[1] == rules.Tier("gold", 9000, None, 0, 0, (), ())


@pytest.mark.parametrize("name, order", sorted(rules.SPEND_ORDERS.items()))
def test_spend_orders(name, order):
    assert parse_program(f'spend_order = "{name}"\n').spend_order == order


@pytest.mark.parametrize("value, problem", [
    ("1", "spend_order must be a string (got an integer)"),
    ('"bonus"', ("spend_order must be one of principal_first, bonus_first, proportional "
                 "(got 'bonus')")),
])
def test_spend_order_refusals(value, problem):
    err = error_of(f'pin_tries_max = 3\nspend_order = {value}\n')
    assert (err.line, err.problem) == (2, problem)


@pytest.mark.parametrize("body, fields", [
    ("points = 100\nvalue_minor = 100\n", (100, 100, 10000)),
    (f"points = {2**63 - 1}\nvalue_minor = 1\ncap_bp = 0\n", (2**63 - 1, 1, 0)),
    ("value_minor = 50\ncap_bp = 10000\npoints = 1\n", (1, 50, 10000)),
])
def test_redemption_accepted(body, fields):
    program = parse_program("[redemption]\n" + body)
    assert (program.redeem_points, program.redeem_value_minor, program.redeem_cap_bp) == fields


@pytest.mark.parametrize("doc, line, problem", [
    ("[redemption]\npoints = 1\nvalue_minor = 1\ncap = 5000\n", 4,
     "redemption: unknown key 'cap' (known: points, value_minor, cap_bp)"),
    ("pin_tries_max = 3\n\n[redemption]\npoints = 1\n", 3, "redemption: missing value_minor"),
    ("[redemption]\npoints = 0\nvalue_minor = 1\n", 2, "redemption: points must be 1..2**63-1"),
    ("[redemption]\npoints = 1\nvalue_minor = true\n", 3,
     "redemption: value_minor must be an integer (got a boolean)"),
    (f"[redemption]\npoints = 1\nvalue_minor = {2**63}\n", 3,
     "redemption: value_minor must be 1..2**63-1"),
    ("[redemption]\npoints = 1\nvalue_minor = 1\ncap_bp = 10001\n", 4,
     "redemption: cap_bp must be 0..10000"),
    ("pin_tries_max = 3\nredemption = 5\n", 2, "redemption must be a table (got an integer)"),
    ("[[redemption]]\npoints = 1\nvalue_minor = 1\n", 1,
     "redemption must be a table (got an array)"),
    ("redemption.points = 1\nredemption.value_minor = -1\n", 2,
     "redemption: value_minor must be 1..2**63-1"),
])
def test_redemption_refusals(doc, line, problem):
    err = error_of(doc)
    assert (err.line, err.problem) == (line, problem)


def test_categories_keep_document_order_and_default_to_discountable():
    program = parse_program(CATEGORIES + '[[categories]]\ncode = 63\nname = "x y"\n')
    assert program.categories == (rules.Category(1, "drinks"), rules.Category(5, "tobacco", False),
                                  rules.Category(63, "x y", True))
    assert parse_program("categories = []\n").categories == ()


@pytest.mark.parametrize("change, line, problem", [
    ("code = 5\ncolour = 1", 6, ("category 'tobacco': unknown key 'colour' "
                                 "(known: code, name, discountable)")),
    ('code = "5"', 5, "category 'tobacco': code must be an integer (got a string)"),
    ("code = 0", 5, "category 'tobacco': code must be 1..63"),
    ("code = 64", 5, "category 'tobacco': code must be 1..63"),
    ("code = 1", 5, "category #2: duplicate category code 1 (also category #1)"),
    ("code = 5\ndiscountable = 0", 6,
     "category 'tobacco': discountable must be a boolean (got an integer)"),
])
def test_category_refusals(change, line, problem):
    err = error_of(CATEGORIES.replace("code = 5", change).replace("discountable = false\n", ""))
    assert (err.line, err.problem) == (line, problem)


@pytest.mark.parametrize("name, problem", [
    ('"drinks"', "category #2: duplicate category name 'drinks' (also category #1)"),
    ('"default"', "category 'default': the name 'default' is reserved for category code 0"),
    ('""', "category #2: name must be 1..32 characters"),
    (f'"{"x" * 33}"', "category #2: name must be 1..32 characters"),
    ('"a\\nb"', "category #2: name 'a\\nb' has unprintable characters"),
    ("2", "category #2: name must be a string (got an integer)"),
])
def test_category_name_refusals(name, problem):
    err = error_of(CATEGORIES.replace('name = "tobacco"', f"name = {name}"))
    assert (err.line, err.problem) == (6, problem)


def test_category_missing_a_key_reports_its_header_unless_a_key_is_misspelt():
    err = error_of(CATEGORIES.replace('name = "tobacco"\n', ""))
    assert (err.line, err.problem) == (4, "category #2: missing name")
    err = error_of(CATEGORIES.replace('name = "tobacco"', 'nmae = "tobacco"'))
    assert err.line == 6 and err.problem.startswith("category #2: unknown key 'nmae'")


def test_sixty_four_categories_report_the_sixty_fourth_header_and_sixty_three_pass():
    assert len(parse_program(categories_doc(63)).categories) == 63
    err = error_of(categories_doc(64))
    assert (err.line, err.problem) == (190, "too many categories: 64 (at most 63)")


def test_tier_extras_in_inline_dotted_and_sub_tables_are_sorted_by_code():
    doc = CATEGORIES + ('[[categories]]\ncode = 3\nname = "hot food"\n'
                        '[[tiers]]\nname = "silver"\nrate_bp = 9500\n'
                        'category_rate_bp = { "hot food" = 9000, drinks = 9200 }\n'
                        'category_points_per_unit.tobacco = 0\n'
                        'category_points_per_unit."hot food" = 4\n'
                        '[[tiers]]\nname = "gold"\nrate_bp = 9000\nupgrade_top_up_minor = 1\n'
                        '[tiers.category_points_per_unit]\ndrinks = 9223372036854775807\n'
                        '[tiers.category_rate_bp]\n"hot food" = 1\n')
    standard, silver, gold = parse_program(doc).tiers
    assert standard == rules.Tier("standard", 10000)
    assert silver == rules.Tier("silver", 9500, None, 0, 0, ((1, 9200), (3, 9000)),
                                ((3, 4), (5, 0)))
    assert gold == rules.Tier("gold", 9000, None, 0, 1, ((3, 1),), ((1, 2**63 - 1),))


@pytest.mark.parametrize("key, value, problem", [
    ("points_per_unit", "0", None),
    ("points_per_unit", "-1", "points_per_unit must be 0..2**63-1"),
    ("points_per_unit", "1.5", "points_per_unit must be an integer (got a float)"),
    ("upgrade_spend_minor", str(2**63 - 1), None),
    ("upgrade_spend_minor", str(2**63), "upgrade_spend_minor must be 0..2**63-1"),
    ("upgrade_top_up_minor", "-1", "upgrade_top_up_minor must be 0..2**63-1"),
    ("category_rate_bp", "9000", "category_rate_bp must be a table (got an integer)"),
    ("category_rate_bp", "{ drinks = 0 }", "category_rate_bp.drinks must be 1..10000"),
    ("category_rate_bp", "{ drinks = 10001 }", "category_rate_bp.drinks must be 1..10000"),
    ("category_rate_bp", '{ drinks = "90%" }',
     "category_rate_bp.drinks must be an integer (got a string)"),
    ("category_rate_bp", "{ drinkz = 9000 }",
     ("category_rate_bp.drinkz: no category 'drinkz' in [[categories]] "
     "(declared: drinks, tobacco)")),
    ("category_rate_bp", "{ tobacco = 9000 }",
     "category_rate_bp.tobacco: category 'tobacco' is not discountable (it always pays 100 %)"),
    ("category_rate_bp", "{ default = 9000 }",
     "category_rate_bp.default: the default category takes the tier's own rate_bp"),
    ("category_points_per_unit", "{ tobacco = 0, drinks = -1 }",
     "category_points_per_unit.drinks must be 0..2**63-1"),
    ("category_points_per_unit", '{ "hot food" = 1 }',
     ("category_points_per_unit.\"hot food\": no category 'hot food' in [[categories]] "
     "(declared: drinks, tobacco)")),
])
def test_second_tier_keys(key, value, problem):
    doc = CATEGORIES + f'[[tiers]]\nname = "gold"\nrate_bp = 9000\n{key} = {value}\n'
    if problem is None:
        assert parse_program(doc).tiers[1].name == "gold"
    else:
        err = error_of(doc)
        assert (err.line, err.problem) == (14, f"tier 'gold': {problem}")


@pytest.mark.parametrize("key", ["upgrade_spend_minor", "upgrade_top_up_minor"])
def test_the_first_tier_is_not_reached_by_an_upgrade(key):
    err = error_of(CATEGORIES + f"{key} = 1\n")
    assert (err.line, err.problem) == (
        11, f"tier 'standard': {key} must be 0: the first tier is not reached by an upgrade")
    assert parse_program(CATEGORIES + f"{key} = 0\n").tiers[0] == rules.Tier("standard", 10000)


def test_category_names_in_sub_tables_report_their_own_tiers_lines():
    doc = CATEGORIES + ('[tiers.category_rate_bp]\n'   # 11: the first tier's
                        '{first} = 9000\n'             # 12
                        '[[tiers]]\n'                  # 13
                        'name = "gold"\n'              # 14
                        'rate_bp = 9000\n'             # 15
                        '[tiers.category_rate_bp]\n'   # 16: the second tier's
                        'drinks = 9000\n'              # 17
                        '{second} = 9000\n')           # 18
    declared = "in [[categories]] (declared: drinks, tobacco)"
    err = error_of(doc.format(first="drinks", second="drinkz"))
    assert (err.line, err.problem) == (
        18, f"tier 'gold': category_rate_bp.drinkz: no category 'drinkz' {declared}")
    err = error_of(doc.format(first="x", second="drinkz"))
    assert (err.line, err.problem) == (
        12, f"tier 'standard': category_rate_bp.x: no category 'x' {declared}")
    program = parse_program(doc.format(first="drinks", second="# drinkz"))
    assert [t.category_rate_bp for t in program.tiers] == [((1, 9000),), ((1, 9000),)]


def test_tier_overrides_without_categories_say_none_are_declared():
    err = error_of('[[tiers]]\nname = "a"\nrate_bp = 1\ncategory_points_per_unit = { x = 0 }\n')
    assert (err.line, err.problem) == (
        4, ("tier 'a': category_points_per_unit.x: no category 'x' in [[categories]] "
            "(declared: none)"))


def test_categories_that_are_not_an_array_of_tables_do_not_make_names_undeclared():
    doc = ('[[tiers]]\nname = "a"\nrate_bp = 1\ncategory_rate_bp = { drinks = 9000 }\n'
           '[categories]\ndrinks = 1\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (5, "categories must be an array of tables (got a table)")


def test_promotion_dates_are_exact_unix_microseconds():
    epoch_day = datetime.date(1970, 1, 1).toordinal()
    last_day = datetime.date(9999, 12, 31).toordinal() - epoch_day
    doc = promotion(starts="1970-01-01T08:00:00.000001+08:00",
                    ends="9999-12-31T23:59:59.999999-23:59")
    (p,) = parse_program(doc).promotions
    assert p.starts_us == 1
    assert p.ends_us == ((last_day * 86400 + 86399 + 23 * 3600 + 59 * 60) * 10**6 + 999999)
    (p,) = parse_program(promotion(ends="2026-01-01T00:00:00Z")).promotions
    assert (p.starts_us, p.ends_us) == (0, 1767225600 * 10**6)
    (p,) = parse_program(promotion(starts="2026-01-01T00:00:00Z")).promotions
    assert (p.starts_us, p.ends_us) == (1767225600 * 10**6, 2**63 - 1)


@pytest.mark.parametrize("changes, line, problem", [
    ({"colour": '"red"'}, 7, ("promotion 3: unknown key 'colour' (known: id, name, kind, "
                              "min_top_up_minor, bonus_minor, bonus_bp, max_bonus_minor, starts, "
                              "ends, per_card_limit)")),
    ({"id": None}, 1, "promotion #1: missing id"),
    ({"min_top_up_minor": None}, 1, "promotion 3: missing min_top_up_minor"),
    ({"id": "0"}, 2, "promotion #1: id must be 1..65535"),
    ({"id": "65536"}, 2, "promotion #1: id must be 1..65535"),
    ({"id": '"3"'}, 2, "promotion #1: id must be an integer (got a string)"),
    ({"name": '""'}, 3, "promotion 3: name must be 1..32 characters"),
    ({"name": f'"{"x" * 33}"'}, 3, "promotion 3: name must be 1..32 characters"),
    ({"kind": '"pct"'}, 4, ("promotion 3: kind must be one of fixed, percent, first_top_up "
                            "(got 'pct')")),
    ({"kind": "2"}, 4, "promotion 3: kind must be a string (got an integer)"),
    ({"min_top_up_minor": "0"}, 5, "promotion 3: min_top_up_minor must be 1..2**63-1"),
    ({"bonus_minor": "0"}, 6, "promotion 3: bonus_minor must be 1..2**63-1"),
    ({"bonus_minor": None}, 1, ("promotion 3: missing bonus_minor (required for a fixed "
                                "promotion)")),
    ({"kind": '"first_top_up"', "bonus_minor": None}, 1,
     "promotion 3: missing bonus_minor (required for a first_top_up promotion)"),
    ({"bonus_bp": "1000"}, 7, ("promotion 3: bonus_bp is only for percent promotions "
                               "(a fixed promotion gives bonus_minor)")),
    ({"bonus_bp": "99999"}, 7, ("promotion 3: bonus_bp is only for percent promotions "
                                "(a fixed promotion gives bonus_minor)")),
    ({"kind": '"first_top_up"', "max_bonus_minor": "10"}, 7,
     ("promotion 3: max_bonus_minor is only for percent promotions "
     "(a first_top_up promotion gives bonus_minor)")),
    ({"kind": '"percent"', "bonus_bp": "1000"}, 6,
     ("promotion 3: bonus_minor is only for fixed and first_top_up promotions "
     "(a percent promotion gives bonus_bp)")),
    ({"kind": '"percent"', "bonus_minor": None}, 1,
     "promotion 3: missing bonus_bp (required for a percent promotion)"),
    ({"kind": '"percent"', "bonus_minor": None, "bonus_bp": "10001"}, 6,
     "promotion 3: bonus_bp must be 1..10000"),
    ({"kind": '"percent"', "bonus_minor": None, "bonus_bp": "1", "max_bonus_minor": "-1"}, 7,
     "promotion 3: max_bonus_minor must be 0..2**63-1"),
    ({"starts": "2026-12-24T00:00:00"}, 7,
     ("promotion 3: starts must be a date-time with its UTC offset, such as "
     "2026-12-24T00:00:00+08:00 (got a local date-time)")),
    ({"ends": "2026-12-24"}, 7,
     ("promotion 3: ends must be a date-time with its UTC offset, such as "
     "2026-12-24T00:00:00+08:00 (got a date)")),
    ({"ends": '"2026-12-24T00:00:00+08:00"'}, 7,
     ("promotion 3: ends must be a date-time with its UTC offset, such as "
     "2026-12-24T00:00:00+08:00 (got a string)")),
    ({"starts": "1969-12-31T23:59:59Z"}, 7,
     "promotion 3: starts must not be before 1970-01-01T00:00:00Z"),
    ({"ends": "2026-12-24T00:00:00+08:00", "starts": "2026-12-23T16:00:00Z"}, 7,
     ("promotion 3: starts must be before ends "
     "(starts 2026-12-23T16:00:00+00:00, ends 2026-12-24T00:00:00+08:00)")),
    ({"starts": "2026-12-28T00:00:00+08:00", "ends": "2026-12-24T00:00:00+08:00"}, 8,
     ("promotion 3: starts must be before ends "
     "(starts 2026-12-28T00:00:00+08:00, ends 2026-12-24T00:00:00+08:00)")),
    ({"ends": "1970-01-01T00:00:00Z"}, 7, ("promotion 3: starts must be before ends "
                                           "(starts 1970-01-01T00:00:00+00:00, "
                                           "ends 1970-01-01T00:00:00+00:00)")),
    ({"per_card_limit": "256"}, 7, "promotion 3: per_card_limit must be 0..255"),
    ({"per_card_limit": "-1"}, 7, "promotion 3: per_card_limit must be 0..255"),
])
def test_promotion_refusals(changes, line, problem):
    err = error_of(promotion(**changes))
    assert (err.line, err.problem) == (line, problem)


def test_promotion_boundaries_pass():
    (p,) = parse_program(promotion(id="65535", per_card_limit="255", bonus_minor=str(2**63 - 1),
                                   min_top_up_minor="1")).promotions
    assert (p.id, p.per_card_limit, p.bonus_minor, p.min_top_up_minor) == \
        (65535, 255, 2**63 - 1, 1)
    (p,) = parse_program(promotion(kind='"percent"', bonus_minor=None, bonus_bp="10000",
                                   max_bonus_minor="0")).promotions
    assert (p.kind, p.bonus_bp, p.max_bonus_minor, p.bonus_minor) == (L.PROMO_PERCENT, 10000, 0, 0)


def test_duplicate_promotion_ids_report_the_second_id_line():
    doc = promotion() + "\n" + promotion(name='"other"')
    err = error_of(doc)
    assert (err.line, err.problem) == (
        9, "promotion #2: duplicate promotion id 3 (also promotion #1)")
    assert len(parse_program(doc.replace("id = 3", "id = 4", 1)).promotions) == 2


def test_seventeen_promotions_report_the_seventeenth_header_and_sixteen_pass():
    def doc(count):  # 6 lines each
        return "".join(promotion(id=str(k + 1)) for k in range(count))
    assert len(parse_program(doc(16)).promotions) == 16
    err = error_of(doc(17))
    assert (err.line, err.problem) == (97, "too many promotions: 17 (at most 16)")


def test_inline_promotions_report_the_promotions_line():
    doc = ('pin_tries_max = 3\n'
           'promotions = [\n'
           '  { id = 1, name = "a", kind = "fixed", min_top_up_minor = 1, bonus_minor = 1 },\n'
           '  { id = 2, name = "b", kind = "fixed", min_top_up_minor = 1, bonus_bp = 1 },\n'
           ']\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (2, ("promotion 2: bonus_bp is only for percent promotions "
                                           "(a fixed promotion gives bonus_minor)"))


def test_example_programs_parse_and_compile():
    def compiled(name):
        packed = parse_program((EXAMPLES / name).read_text(encoding="utf-8")).packed(1)
        head = L.PROGRAM_HEAD.unpack_from(packed)
        rates = array.array("H", packed[L.PROGRAM_RATES_OFFSET:L.PROGRAM_PER_UNIT_OFFSET])
        per_unit = array.array("q", packed[L.PROGRAM_PER_UNIT_OFFSET:L.PROGRAM_PER_UNIT_OFFSET
                                           + 8 * L.MAX_TIERS * L.MAX_CATEGORIES])
        spend, top_up = head[11:11 + L.MAX_TIERS], head[11 + L.MAX_TIERS:]
        return head, rates, per_unit, spend, top_up, packed

    def at(tier, code):
        return tier * L.MAX_CATEGORIES + code

    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == \
        ["cafe.toml", "salon.toml", "supermarket.toml"]
    head, rates, per_unit, spend, top_up, packed = compiled("cafe.toml")
    assert head[:6] == (3, 3, 100, 100, 100, 5000)  # tiers, PIN tries, unit, redemption
    assert (head[7], head[8]) == (L.SPEND_BONUS_FIRST, 3)  # spend order, promotions
    assert L.PROGRAM_HEAD_TAIL.unpack(head[9])[1] == L.SHORTFALL_FORGIVE
    assert head[10][:4] == bytes([3, 3, 3, 1])  # default, drinks, food: discountable; merch not
    assert (spend[:3], top_up[:3]) == ((0, 100000, 300000), (0, 0, 100000))
    assert (rates[at(2, 1)], rates[at(2, 3)], per_unit[at(2, 1)], per_unit[at(1, 1)]) == \
        (9000, 10000, 2, 1)
    christmas = L.PROMOTION.unpack_from(packed, L.PROGRAM_HEAD.size + 2 * L.PROMOTION_SIZE)
    assert christmas[:9] == (3, L.PROMO_PERCENT, 2, 1000, 20000, 0, 10000,
                             1798041600 * 10**6, 1798387200 * 10**6)
    assert datetime.datetime.fromtimestamp(christmas[7] // 10**6, UTC) == \
        datetime.datetime(2026, 12, 23, 16, tzinfo=UTC)

    head, rates, per_unit, spend, top_up, packed = compiled("salon.toml")
    assert head[:6] == (4, 3, 100, 0, 0, 10000) and (head[7], head[8]) == (L.SPEND_PROPORTIONAL, 2)
    assert top_up[:4] == (0, 100000, 300000, 500000) and spend[:4] == (0, 0, 0, 0)
    assert [(rates[at(t, 1)], rates[at(t, 2)]) for t in range(4)] == \
        [(10000, 10000), (8800, 9500), (7800, 9000), (6800, 8500)]
    assert max(per_unit) == 0

    head, rates, per_unit, spend, top_up, packed = compiled("supermarket.toml")
    assert head[:6] == (3, 3, 100, 100, 100, 2000) and (head[7], head[8]) == (0, 0)
    assert head[10][:5] == bytes([3, 3, 3, 1, 1])
    assert spend[:3] == (0, 200000, 1000000) and top_up[:3] == (0, 0, 0)
    # codes 0 default, 1 fresh, 2 grocery, 3 tobacco, 4 gift_cards; gold pays 90 % on fresh
    for t, (rate, fresh, per) in enumerate([(10000, 10000, 1), (9800, 9800, 1), (9500, 9000, 2)]):
        assert [rates[at(t, c)] for c in range(5)] == [rate, fresh, rate, 10000, 10000]
        assert [per_unit[at(t, c)] for c in range(5)] == [per, per, per, 0, 0]


# --- coupons -------------------------------------------------------------------------------

COUPON_KEYS = ("id, name, kind, category, min_spend_minor, amount_off_minor, percent_bp, "
               "max_off_minor, valid_days, points_price")


def coupon(**changes: str | None) -> str:
    """A [[coupons]] table (header on its first line, then one key a line in this order: id,
    name, kind, amount_off_minor, then the changed or added keys). Values are TOML text; None
    leaves a key out. After CATEGORIES (10 lines) its header is on line 11."""
    keys = {"id": "3", "name": '"5 off"', "kind": '"amount_off"', "amount_off_minor": "500",
            **changes}
    return "[[coupons]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


def test_example_programs_coupons():
    def coupons(name):
        return parse_program((EXAMPLES / name).read_text(encoding="utf-8")).coupons

    # supermarket: 1 fresh, 2 grocery, 3 tobacco, 4 gift_cards
    assert coupons("supermarket.toml") == (
        rules.Coupon(1, "50 off 500", L.COUPON_AMOUNT_OFF, -1, min_spend_minor=50000,
                     amount_off_minor=5000, valid_days=30),
        rules.Coupon(2, "fresh 10 % off", L.COUPON_PERCENT_OFF, 1, percent_bp=1000,
                     max_off_minor=2000, valid_days=14, points_price=500))
    assert coupons("salon.toml") == (  # 1 services
        rules.Coupon(1, "one free haircut", L.COUPON_FREE_ITEM, 1, max_off_minor=8000,
                     valid_days=90, points_price=0),)
    assert coupons("cafe.toml") == (  # 1 drinks
        rules.Coupon(1, "free drink", L.COUPON_FREE_ITEM, 1, max_off_minor=3500, valid_days=30,
                     points_price=1000),)


def test_coupons_parse_with_their_defaults():
    doc = (CATEGORIES
           + coupon()
           + coupon(id="4", kind='"percent_off"', amount_off_minor=None, percent_bp="10000",
                    category='"drinks"', min_spend_minor="0", max_off_minor="0",
                    valid_days="3660", points_price=str(2**63 - 1))
           + coupon(id="65535", kind='"free_item"', amount_off_minor=None, category='"default"',
                    max_off_minor=str(2**63 - 1), valid_days="1")
           + coupon(id="1", amount_off_minor=str(2**63 - 1), category='"default"',
                    min_spend_minor=str(2**63 - 1)))
    assert parse_program(doc).coupons == (
        rules.Coupon(3, "5 off", L.COUPON_AMOUNT_OFF, -1, 0, 500, 0, 0, 30, 0),
        rules.Coupon(4, "5 off", L.COUPON_PERCENT_OFF, 1, 0, 0, 10000, 0, 3660, 2**63 - 1),
        rules.Coupon(65535, "5 off", L.COUPON_FREE_ITEM, 0, 0, 0, 0, 2**63 - 1, 1, 0),
        rules.Coupon(1, "5 off", L.COUPON_AMOUNT_OFF, 0, 2**63 - 1, 2**63 - 1, 0, 0, 30, 0))
    assert parse_program(CATEGORIES).coupons == ()
    assert parse_program("coupons = []\n" + CATEGORIES).coupons == ()


def test_coupons_without_categories():
    (c,) = parse_program(coupon(category='"default"')).coupons
    assert c.category == 0
    err = error_of(coupon(category='"drinks"'))
    assert (err.line, err.problem) == (
        6, "coupon 3: no category 'drinks' in [[categories]] (declared: none)")


@pytest.mark.parametrize("changes, line, problem", [
    ({"colour": '"red"'}, 16, f"coupon 3: unknown key 'colour' (known: {COUPON_KEYS})"),
    ({"amount_off_minor": None, "amount_of_minor": "500"}, 15,
     f"coupon 3: unknown key 'amount_of_minor' (known: {COUPON_KEYS})"),  # not "missing"
    ({"id": None}, 11, "coupon #1: missing id"),
    ({"name": None}, 11, "coupon 3: missing name"),
    ({"kind": None}, 11, "coupon 3: missing kind"),
    ({"id": "0"}, 12, "coupon #1: id must be 1..65535"),
    ({"id": "65536"}, 12, "coupon #1: id must be 1..65535"),
    ({"id": '"3"'}, 12, "coupon #1: id must be an integer (got a string)"),
    ({"name": '""'}, 13, "coupon 3: name must be 1..32 characters"),
    ({"name": f'"{"x" * 33}"'}, 13, "coupon 3: name must be 1..32 characters"),
    ({"name": '"a\\tb"'}, 13, "coupon 3: name 'a\\tb' has unprintable characters"),
    ({"kind": '"percent"'}, 14,
     "coupon 3: kind must be one of amount_off, percent_off, free_item (got 'percent')"),
    ({"kind": "1"}, 14, "coupon 3: kind must be a string (got an integer)"),
    ({"amount_off_minor": None}, 11,
     "coupon 3: missing amount_off_minor (required for an amount_off coupon)"),
    ({"amount_off_minor": "0"}, 15, "coupon 3: amount_off_minor must be 1..2**63-1"),
    ({"amount_off_minor": str(2**63)}, 15, "coupon 3: amount_off_minor must be 1..2**63-1"),
    ({"percent_bp": "1000"}, 16, ("coupon 3: percent_bp is only for percent_off coupons "
                                  "(an amount_off coupon gives amount_off_minor)")),
    ({"max_off_minor": "100"}, 16, ("coupon 3: max_off_minor is only for percent_off and "
                                    "free_item coupons (an amount_off coupon gives "
                                    "amount_off_minor)")),
    ({"kind": '"percent_off"', "percent_bp": "1000"}, 15,
     ("coupon 3: amount_off_minor is only for amount_off coupons "
      "(a percent_off coupon gives percent_bp)")),
    ({"kind": '"percent_off"', "amount_off_minor": None}, 11,
     "coupon 3: missing percent_bp (required for a percent_off coupon)"),
    ({"kind": '"percent_off"', "amount_off_minor": None, "percent_bp": "10001"}, 15,
     "coupon 3: percent_bp must be 1..10000"),
    ({"kind": '"percent_off"', "amount_off_minor": None, "percent_bp": "0"}, 15,
     "coupon 3: percent_bp must be 1..10000"),
    ({"kind": '"percent_off"', "amount_off_minor": None, "percent_bp": "1",
      "max_off_minor": "-1"}, 16, "coupon 3: max_off_minor must be 0..2**63-1"),
    ({"kind": '"free_item"', "amount_off_minor": None}, 11,
     "coupon 3: missing category (required for a free_item coupon)"),
    ({"kind": '"free_item"', "category": '"drinks"'}, 15,
     ("coupon 3: amount_off_minor is only for amount_off coupons "
      "(a free_item coupon gives one item of its category)")),
    ({"kind": '"free_item"', "amount_off_minor": None, "category": '"drinks"',
      "percent_bp": "1000"}, 16,
     ("coupon 3: percent_bp is only for percent_off coupons "
      "(a free_item coupon gives one item of its category)")),
    ({"category": '"drinkz"'}, 16,
     "coupon 3: no category 'drinkz' in [[categories]] (declared: drinks, tobacco)"),
    ({"category": "1"}, 16, "coupon 3: category must be a string (got an integer)"),
    ({"category": '"tobacco"'}, 16, ("coupon 3: category 'tobacco' is not discountable "
                                     "(coupons apply to discountable lines only)")),
    ({"kind": '"free_item"', "amount_off_minor": None, "category": '"tobacco"'}, 15,
     ("coupon 3: category 'tobacco' is not discountable "
      "(coupons apply to discountable lines only)")),
    ({"min_spend_minor": "-1"}, 16, "coupon 3: min_spend_minor must be 0..2**63-1"),
    ({"valid_days": "0"}, 16, "coupon 3: valid_days must be 1..3660"),
    ({"valid_days": "3661"}, 16, "coupon 3: valid_days must be 1..3660"),
    ({"valid_days": "30.0"}, 16, "coupon 3: valid_days must be an integer (got a float)"),
    ({"points_price": "-1"}, 16, "coupon 3: points_price must be 0..2**63-1"),
    ({"points_price": "true"}, 16, "coupon 3: points_price must be an integer (got a boolean)"),
])
def test_coupon_refusals(changes, line, problem):
    err = error_of(CATEGORIES + coupon(**changes))
    assert (err.line, err.problem) == (line, problem)


def test_duplicate_coupon_ids_report_the_second_id_line():
    doc = CATEGORIES + coupon() + "\n" + coupon(name='"other"')
    err = error_of(doc)
    assert (err.line, err.problem) == (18, "coupon #2: duplicate coupon id 3 (also coupon #1)")
    assert len(parse_program(doc.replace("id = 3", "id = 4", 1)).coupons) == 2


def test_thirty_three_coupons_report_the_thirty_third_header_and_thirty_two_pass():
    def doc(count):  # 5 lines each
        return "".join(coupon(id=str(k + 1)) for k in range(count))
    assert len(parse_program(doc(32)).coupons) == L.MAX_COUPONS == 32
    err = error_of(doc(33))
    assert (err.line, err.problem) == (161, "too many coupons: 33 (at most 32)")


def test_coupons_that_are_not_an_array_of_tables_are_refused():
    err = error_of("pin_tries_max = 3\ncoupons = 1\n" + CATEGORIES)
    assert (err.line, err.problem) == (2, "coupons must be an array of tables (got an integer)")
    err = error_of(CATEGORIES + "[coupons]\nid = 1\n")
    assert (err.line, err.problem) == (11, "coupons must be an array of tables (got a table)")


def test_coupon_categories_when_the_categories_are_wrong_report_only_the_categories():
    # not an array of tables: the names cannot be checked
    err = error_of('[categories]\ndrinks = 1\n' + coupon(category='"drinks"'))
    assert (err.line, err.problem) == (1, "categories must be an array of tables (got a table)")
    # a category written with a problem: the coupon naming it says nothing more
    doc = CATEGORIES.replace("code = 5", "code = 99") + coupon(category='"tobacco"')
    err = error_of(doc)
    assert (err.line, err.problem) == (5, "category 'tobacco': code must be 1..63")


def test_inline_coupons_report_the_coupons_line():
    doc = ('pin_tries_max = 3\n'
           'coupons = [\n'
           '  { id = 1, name = "a", kind = "amount_off", amount_off_minor = 1 },\n'
           '  { id = 2, name = "b", kind = "free_item" },\n'
           ']\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (
        2, "coupon 2: missing category (required for a free_item coupon)")


# --- packages ------------------------------------------------------------------------------

PACKAGE_KEYS = "id, name, kind, price_minor, days, uses, category"
USES_ONLY_FOR_COUNT = ("package 3: uses is only for count packages "
                       "(a time package gives any number of uses for its days)")


def package(**changes: str | None) -> str:
    """A [[packages]] table (header on its first line, then one key a line in this order: id,
    name, kind, price_minor, days, uses, then the changed or added keys). Values are TOML text;
    None leaves a key out. After CATEGORIES (10 lines) its header is on line 11."""
    keys = {"id": "3", "name": '"10 coffees"', "kind": '"count"', "price_minor": "30000",
            "days": "365", "uses": "10", **changes}
    return "[[packages]]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v is not None)


def test_example_programs_packages():
    def packages(name):
        return parse_program((EXAMPLES / name).read_text(encoding="utf-8")).packages

    assert packages("salon.toml") == (  # 1 services
        rules.Package(1, "10 haircuts", L.PACKAGE_COUNT, price_minor=80000, days=365, uses=10,
                      category=1),
        rules.Package(2, "month of blow-dries", L.PACKAGE_TIME, price_minor=30000, days=30,
                      uses=0, category=1))
    assert packages("cafe.toml") == (  # 1 drinks
        rules.Package(1, "coffee month pass", L.PACKAGE_TIME, price_minor=29900, days=30,
                      uses=0, category=1),)
    assert packages("supermarket.toml") == ()


def test_packages_parse_with_their_defaults():
    doc = (CATEGORIES
           + package()
           + package(id="4", kind='"time"', uses=None, category='"default"',
                     price_minor=str(2**63 - 1), days="3660")
           + package(id="65535", uses="10000", days="1", price_minor="1",
                     category='"drinks"', name=f'"{"x" * 32}"')
           + package(id="1", uses="1", category='"tobacco"'))  # not discountable: no matter
    assert parse_program(doc).packages == (
        rules.Package(3, "10 coffees", L.PACKAGE_COUNT, 30000, 365, 10, -1),
        rules.Package(4, "10 coffees", L.PACKAGE_TIME, 2**63 - 1, 3660, 0, 0),
        rules.Package(65535, "x" * 32, L.PACKAGE_COUNT, 1, 1, 10000, 1),
        rules.Package(1, "10 coffees", L.PACKAGE_COUNT, 30000, 365, 1, 5))
    assert parse_program(CATEGORIES).packages == ()
    assert parse_program("packages = []\n" + CATEGORIES).packages == ()


def test_packages_without_categories():
    (p,) = parse_program(package(category='"default"')).packages
    assert p.category == 0
    err = error_of(package(category='"drinks"'))
    assert (err.line, err.problem) == (
        8, "package 3: no category 'drinks' in [[categories]] (declared: none)")


@pytest.mark.parametrize("changes, line, problem", [
    ({"colour": '"red"'}, 18, f"package 3: unknown key 'colour' (known: {PACKAGE_KEYS})"),
    ({"uses": None, "use": "10"}, 17,
     f"package 3: unknown key 'use' (known: {PACKAGE_KEYS})"),  # not "missing uses"
    ({"price_minor": None, "price": "300"}, 17,
     f"package 3: unknown key 'price' (known: {PACKAGE_KEYS})"),  # not "missing price_minor"
    ({"id": None}, 11, "package #1: missing id"),
    ({"name": None}, 11, "package 3: missing name"),
    ({"kind": None}, 11, "package 3: missing kind"),
    ({"price_minor": None}, 11, "package 3: missing price_minor"),
    ({"days": None}, 11, "package 3: missing days"),
    ({"id": "0"}, 12, "package #1: id must be 1..65535"),
    ({"id": "65536"}, 12, "package #1: id must be 1..65535"),
    ({"id": '"3"'}, 12, "package #1: id must be an integer (got a string)"),
    ({"name": '""'}, 13, "package 3: name must be 1..32 characters"),
    ({"name": f'"{"x" * 33}"'}, 13, "package 3: name must be 1..32 characters"),
    ({"name": '"a\\tb"'}, 13, "package 3: name 'a\\tb' has unprintable characters"),
    ({"kind": '"pass"'}, 14, "package 3: kind must be one of count, time (got 'pass')"),
    ({"kind": '"Count"'}, 14, "package 3: kind must be one of count, time (got 'Count')"),
    ({"kind": "1"}, 14, "package 3: kind must be a string (got an integer)"),
    ({"price_minor": "0"}, 15, "package 3: price_minor must be 1..2**63-1"),
    ({"price_minor": "-1"}, 15, "package 3: price_minor must be 1..2**63-1"),
    ({"price_minor": str(2**63)}, 15, "package 3: price_minor must be 1..2**63-1"),
    ({"price_minor": "299.0"}, 15, "package 3: price_minor must be an integer (got a float)"),
    ({"days": "0"}, 16, "package 3: days must be 1..3660"),
    ({"days": "3661"}, 16, "package 3: days must be 1..3660"),
    ({"days": "true"}, 16, "package 3: days must be an integer (got a boolean)"),
    ({"kind": '"time"'}, 17, USES_ONLY_FOR_COUNT),
    ({"kind": '"time"', "uses": "0"}, 17, USES_ONLY_FOR_COUNT),  # not "uses must be 1..10000"
    ({"uses": None}, 11, "package 3: missing uses (required for a count package)"),
    ({"uses": "0"}, 17, "package 3: uses must be 1..10000"),
    ({"uses": "10001"}, 17, "package 3: uses must be 1..10000"),
    ({"uses": '"10"'}, 17, "package 3: uses must be an integer (got a string)"),
    ({"category": '"drinkz"'}, 18,
     "package 3: no category 'drinkz' in [[categories]] (declared: drinks, tobacco)"),
    ({"category": "1"}, 18, "package 3: category must be a string (got an integer)"),
    ({"category": '""'}, 18, "package 3: category must be 1..32 characters"),
])
def test_package_refusals(changes, line, problem):
    err = error_of(CATEGORIES + package(**changes))
    assert (err.line, err.problem) == (line, problem)


def test_a_time_package_without_uses_passes():
    (p,) = parse_program(CATEGORIES + package(kind='"time"', uses=None)).packages
    assert (p.kind, p.uses) == (L.PACKAGE_TIME, 0)


def test_duplicate_package_ids_report_the_second_id_line():
    doc = CATEGORIES + package() + "\n" + package(name='"other"')
    err = error_of(doc)
    assert (err.line, err.problem) == (20, "package #2: duplicate package id 3 (also package #1)")
    assert len(parse_program(doc.replace("id = 3", "id = 4", 1)).packages) == 2


def test_thirty_three_packages_report_the_thirty_third_header_and_thirty_two_pass():
    def doc(count):  # 7 lines each
        return "".join(package(id=str(k + 1)) for k in range(count))
    assert len(parse_program(doc(32)).packages) == L.MAX_PACKAGES == 32
    err = error_of(doc(33))
    assert (err.line, err.problem) == (225, "too many packages: 33 (at most 32)")


def test_packages_that_are_not_an_array_of_tables_are_refused():
    err = error_of("pin_tries_max = 3\npackages = 1\n" + CATEGORIES)
    assert (err.line, err.problem) == (2, "packages must be an array of tables (got an integer)")
    err = error_of(CATEGORIES + "[packages]\nid = 1\n")
    assert (err.line, err.problem) == (11, "packages must be an array of tables (got a table)")


def test_package_categories_when_the_categories_are_wrong_report_only_the_categories():
    err = error_of('[categories]\ndrinks = 1\n' + package(category='"drinks"'))
    assert (err.line, err.problem) == (1, "categories must be an array of tables (got a table)")
    doc = CATEGORIES.replace("code = 5", "code = 99") + package(category='"tobacco"')
    err = error_of(doc)
    assert (err.line, err.problem) == (5, "category 'tobacco': code must be 1..63")


def test_inline_packages_report_the_packages_line():
    doc = ('pin_tries_max = 3\n'
           'packages = [\n'
           '  { id = 1, name = "a", kind = "time", price_minor = 1, days = 7 },\n'
           '  { id = 2, name = "b", kind = "count", price_minor = 1, days = 7 },\n'
           ']\n')
    err = error_of(doc)
    assert (err.line, err.problem) == (2, "package 2: missing uses (required for a count package)")
