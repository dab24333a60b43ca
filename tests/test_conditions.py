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
    ("cobatch_b8_solo_simultaneous", "takes no delay"),
    ("stagger_b8_jailbreak_p0", "stagger_b8_jailbreak_simultaneous"),
    ("stagger_b8_jailbreak_m0", "stagger_b8_jailbreak_simultaneous"),
    ("stagger_b8_jailbreak_minimal", "expected"),
    ("stagger_b8_jailbreak_overlap", "expected"),
    ("sync_b8_ph3a", "sync takes no"),
    ("list_b8_ph3b", "phase tag only with a filler pool"),
    ("list_b8_jailbreak_p250", "list takes no delay"),
    ("list_b8_solo", "static batch needs fillers"),
    ("list_b8_friends", "filler pool must be one of"),
    ("cobatch_b8", "needs a filler pool"),
    ("cobatch_b8_solo_ph", "expected"),
    ("cobatch_b8_solo_ph3A", "expected"),
    ("conc_c0", "conc_c<n>"),
    ("conc_b4", "conc_c<n>"),
    ("conc_c4_benign", "conc_c<n>"),
    ("conc_c4_ph3", "conc_c<n>"),
    ("sync_c4", "expected"),
    ("sync_b1_repeat_repeat", "repeated once"),
    ("repeat", "expected"),
    ("cobatch_b8_repeat", "filler pool"),
])
def test_parse_rejects(name, fragment):
    with pytest.raises(BatchflipError, match=fragment) as err:
        parse_condition(name)
    assert name in str(err.value)


def test_temporal_phase_names():
    c = parse_condition("stagger_b8_jailbreak_simultaneous")
    assert (c.dispatch, c.pool, c.stagger_ms, c.timing, c.phase) == (
        "stagger", "jailbreak", 0, "simultaneous", None)
    c = parse_condition("stagger_b8_jailbreak_minimal_overlap")
    # event-driven (the target's first token), no fixed delay
    assert (c.stagger_ms, c.timing) == (0, "minimal_overlap")
    assert parse_condition("stagger_b8_benign_m500").timing == "offset"
    assert parse_condition("cobatch_b8_benign").timing is None


def test_phase_tags_and_static_batching():
    c = parse_condition("cobatch_b8_solo_ph3a")
    assert (c.dispatch, c.pool, c.phase, c.composition) == ("cobatch", "solo", "3a", True)
    c = parse_condition("list_b8_jailbreak_ph3b")
    assert (c.dispatch, c.batch_size, c.pool, c.phase, c.composition) == (
        "list", 8, "jailbreak", "3b", True)
    assert parse_condition("list_b8_benign").composition
    assert not parse_condition("list_b8").composition  # Study A's true batching
    c = parse_condition("stagger_b8_jailbreak_m250_phx1")
    assert (c.stagger_ms, c.phase) == (-250, "x1")


def test_concurrency_stream_names():
    c = parse_condition("conc_c8")
    assert (c.dispatch, c.batch_size, c.concurrency, c.pool, c.composition) == (
        "conc", 8, 8, None, False)
    assert parse_condition("conc_c1").concurrency == 1
    assert parse_condition("sync_b8").concurrency is None


def test_repeat_controls():
    for name, base in (("sync_b1_repeat", "sync_b1"), ("conc_c1_repeat", "conc_c1"),
                       ("cobatch_b8_solo_repeat", "cobatch_b8_solo"),
                       ("cobatch_b8_solo_ph3a_repeat", "cobatch_b8_solo_ph3a")):
        c, b = parse_condition(name), parse_condition(base)
        assert c.repeat and not b.repeat and c.base == base and b.base == base
        assert (c.dispatch, c.batch_size, c.pool, c.phase, c.composition) == (
            b.dispatch, b.batch_size, b.pool, b.phase, b.composition)
        assert c.name == name
