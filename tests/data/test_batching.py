import random

from phitune.data.batching import collate, epoch_batches, split_micro
from phitune.data.chat import IGNORE_INDEX, Example


def long_tailed(n=400, seed=0):
    rng = random.Random(seed)
    return [int(20 + rng.paretovariate(1.2) * 30) % 1000 for _ in range(n)]


def test_each_example_once_per_epoch_and_deterministic():
    lengths = long_tailed()
    a = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert a == epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=2)
    assert max(lengths[i] for i in a[0]) == max(lengths)  # longest batch first


def test_length_grouping_cuts_padding_on_long_tailed_lengths():
    lengths = long_tailed()

    def pad_fraction(batches):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    naive = [order[i : i + 8] for i in range(0, len(order), 8)]
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0)
    assert pad_fraction(naive) > 0.4
    assert pad_fraction(grouped) < 0.1


def test_collate_pads_right_with_masked_labels():
    ex = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "a"), Example([8], [8], "b")]
    batch = collate(ex, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert split_micro(list(range(8)), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_auto_groups_only_where_random_batches_would_mostly_pad():
    from phitune.data.batching import padding_fraction, should_group

    uniform = [random.Random(1).randint(40, 51) for _ in range(256)]
    tailed = long_tailed()
    assert not should_group(uniform, 16, seed=0) and should_group(tailed, 8, seed=0)
    assert should_group(uniform, 16, 0, "on") and not should_group(tailed, 8, 0, "off")
    plain = epoch_batches(tailed, 8, seed=3, epoch=1, group=False)
    assert sorted(i for b in plain for i in b) == list(range(len(tailed)))  # each example once
    assert plain == epoch_batches(tailed, 8, seed=3, epoch=1, group=False)  # a resume sees the same
    assert padding_fraction(tailed, plain) > 0.4 > 0.1 > padding_fraction(tailed, epoch_batches(tailed, 8, 3, 1))
    # Random batches are random: their lengths are as mixed as the data's, not sorted
    spreads = [max(tailed[i] for i in b) - min(tailed[i] for i in b) for b in plain]
    assert sum(spreads) / len(spreads) > 50
