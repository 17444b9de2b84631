"""Card numbers: masking and the keyed index."""
import pytest

from cardcore import cards


@pytest.mark.parametrize("number,masked", [
    ("12345678", "******78"),
    ("1234567890", "******7890"),
    ("123456789012", "12******9012"),
    ("6225880000001231", "622588******1231"),
    ("1234567890123456789", "123456*********6789"),
])
def test_a_masked_number_hides_at_least_six_digits(number, masked):
    assert cards.mask(number) == masked
    assert masked.count("*") >= 6


def test_the_card_id_depends_on_the_key_and_hides_the_number():
    a = cards.card_id(bytes(32), "6225880000001231")
    assert len(a) == 16 and a == cards.card_id(bytes(32), "6225880000001231")
    assert a != cards.card_id(bytes(31) + b"\x01", "6225880000001231")
    assert b"6225880000001231" not in a


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=500, deadline=None)
@given(key=st.binary(min_size=16, max_size=64), number=st.text(alphabet="0123456789", max_size=19))
def test_the_fast_index_equals_one_shot_hmac(key, number):
    assert cards.CardIndex(key).card_id(number) == cards.card_id(key, number)
