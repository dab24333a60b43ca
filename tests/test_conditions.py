import pytest

from batchflip.conditions import parse_condition
from batchflip.errors import BatchflipError


def test_parse_valid_names():
    c = parse_condition("sync_b8")
    assert (c.dispatch, c.batch_size, c.pool, c.composition) == ("sync", 8, None, False)
    c = parse_condition("cobatch_b8_benign")
    assert (c.dispatch, c.batch_size, c.pool, c.composition) == ("cobatch", 8, "benign", True)
    assert parse_condition("stagger_b8_jailbreak_m250").stagger_ms == -250
    assert parse_condition("stagger_b8_jailbreak_p1000").stagger_ms == 1000
    assert parse_condition("list_b4").dispatch == "list"


@pytest.mark.parametrize("name, fragment", [
    ("sync_8", "expected"),
    ("sync_b0", "expected"),
    ("sync_b4_benign", "takes no filler pool"),
    ("cobatch_b8_friends", "filler pool must be one of"),
    ("stagger_b8_benign", "needs a delay"),
    ("cobatch_b8_benign_m250", "takes no delay"),
])
def test_parse_rejects(name, fragment):
    with pytest.raises(BatchflipError, match=fragment) as err:
        parse_condition(name)
    assert name in str(err.value)
