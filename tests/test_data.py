"""Toy instruction data: tokenizer, tasks, judge, generators (seeded, held-out split)."""
import random

import pytest
import torch

from rlhf_ops.train import data as D

CFG = D.DataConfig()


def test_tokenizer_roundtrip_and_specials():
    s = "R abch>hcba\n"
    ids = D.encode(s)
    assert D.decode(ids, stop_at_eos=False) == s
    assert D.decode(ids) == "R abch>hcba"                    # stops at EOS
    assert D.decode(ids[:3] + [D.PAD] + ids[3:]) == s[:3]     # stops at PAD
    assert D.VOCAB[D.EOS] == "\n" and D.PAD == 0 and len(set(D.VOCAB)) == D.VOCAB_SIZE
    with pytest.raises(KeyError):
        D.encode("z")


@pytest.mark.parametrize("prompt,answer", [("R abc>", "cba"), ("S cab>", "abc"), ("A 12+7>", "19"),
                                           ("A 0+0>", "0")])
def test_answers(prompt, answer):
    assert D.answer_of(prompt) == answer


def test_judge_scores_closeness():
    assert D.judge("R abcd>", "dcba") == 1.0
    assert D.judge("R abcd>", "dcb") == pytest.approx(0.75)      # one deletion
    assert D.judge("R abcd>", "dcbb") == pytest.approx(0.75)     # one substitution
    assert D.judge("R abcd>", "") == 0.0
    assert D.judge("R abcd>", "abcd") < D.judge("R abcd>", "dcbd")
    rng = random.Random(0)
    for _ in range(200):
        t = D.draw_task(rng, CFG)
        r = "".join(rng.choice(D.LETTERS + "0123") for _ in range(rng.randint(0, 7)))
        assert 0.0 <= D.judge(t.prompt, r) <= 1.0
        assert D.judge(t.prompt, t.answer) == 1.0


def test_edit_distance():
    assert D.edit_distance("kitten", "sitting") == 3
    assert D.edit_distance("", "abc") == 3 and D.edit_distance("abc", "abc") == 0


def test_pretrain_batch_seeded_shifted_and_noisy():
    x, y = D.pretrain_batch(3, 7, 4, 20, CFG)
    x2, y2 = D.pretrain_batch(3, 7, 4, 20, CFG)
    x3, _ = D.pretrain_batch(3, 8, 4, 20, CFG)
    assert x.shape == y.shape == (4, 20) and x.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1])                     # y is the next token of x
    # the corpus contains both right and (with noise) wrong answers
    docs = []
    for row in D.pretrain_batch(0, 0, 64, 40, CFG)[0].tolist():
        docs += D.decode(row, stop_at_eos=False).split("\n")[1:-1]     # whole documents only
    right = [D.judge(d[:d.index(">") + 1], d[d.index(">") + 1:]) == 1.0 for d in docs]
    assert 0.2 < sum(right) / len(right) < 0.9


def test_sft_batch_targets_only_response():
    b = D.sft_batch(0, 0, 6, CFG)
    for i, p in enumerate(b["prompts"]):
        resp = [t for t in b["y_resp"][i].tolist() if t != D.IGNORE]
        assert D.decode(resp, stop_at_eos=False) == D.answer_of(p) + "\n"
        full = [t for t in b["y_all"][i].tolist() if t != D.IGNORE]
        assert D.decode(full, stop_at_eos=False) == (p + D.answer_of(p) + "\n")[1:]
        assert int(b["full"][i, b["last"][i]]) == D.EOS
    assert torch.equal(D.sft_batch(0, 0, 6, CFG)["x"], b["x"])


def test_fixed_demo_set_epochs():
    """sft.n_demos = N: every epoch visits the same N distinct training prompts once, reshuffled."""
    n, B = 12, 4
    demos = D.demo_set(0, n, CFG)
    assert len({t.prompt for t in demos}) == n and not any(D.is_heldout(t.prompt, CFG) for t in demos)
    epoch = lambda e: [p for i in range(e * n // B, (e + 1) * n // B)
                       for p in D.sft_batch(0, i, B, CFG, n_demos=n)["prompts"]]
    e0, e1 = epoch(0), epoch(1)
    assert sorted(e0) == sorted(e1) == sorted(t.prompt for t in demos)
    assert e0 != e1                                            # a new order each epoch
    assert D.sft_batch(0, 5, B, CFG, n_demos=n)["prompts"] == D.sft_batch(0, 5, B, CFG, n_demos=n)["prompts"]
    with pytest.raises(ValueError, match="n_demos"):
        D.demo_set(0, 10_000, D.DataConfig(min_len=2, max_len=2, tasks="R"))


def test_heldout_split_is_disjoint():
    held = set(D.eval_prompts(0, 50, CFG))
    assert len(held) == 50 and all(D.is_heldout(p, CFG) for p in held)
    train = set(D.prompts(0, "ppo", 0, 2000, CFG)) | set(D.sft_batch(0, 1, 500, CFG)["prompts"])
    assert not (held & train)
    assert all(not D.is_heldout(p, CFG) for p in train)


def test_ranks_from_scores_ties_and_absent():
    assert D.ranks_from_scores([0.5, 1.0, 0.5, 0.0], 6) == [1, 0, 1, 2, -1, -1]
    assert D.ranks_from_scores([1.0, 1.0], 2) == [0, 0]


def test_filler_habit_in_demonstrations_and_corpus_penalised_by_the_judge():
    """data.filler: that fraction of written answers (SFT demonstrations and pretraining documents)
    end with the filler; the judge scores it as one wrong character; filler=0 is the perfect toy."""
    cfg = D.DataConfig(filler=0.7, tasks="RS", max_len=4)
    b = D.sft_batch(0, 0, 400, cfg)
    with_filler = 0
    for i, p in enumerate(b["prompts"]):
        resp = D.decode([t for t in b["y_resp"][i].tolist() if t != D.IGNORE])
        with_filler += resp.endswith(D.FILLER)
        assert resp.removesuffix(D.FILLER) == D.answer_of(p)        # the letters are always right
        if resp.endswith(D.FILLER):
            assert D.judge(p, resp) == pytest.approx(1 - 1 / (len(resp)))
    assert 0.6 < with_filler / 400 < 0.8
    docs = []
    for row in D.pretrain_batch(0, 0, 64, 40, cfg)[0].tolist():
        docs += D.decode(row, stop_at_eos=False).split("\n")[1:-1]
    assert 0.55 < sum(d.endswith(D.FILLER) for d in docs) / len(docs) < 0.85
    # a fixed demonstration set keeps each demo's habit from epoch to epoch
    first = {p: r for p, r in zip(*_demo_responses(D.sft_batch(0, 0, 12, cfg, n_demos=12)))}
    again = {p: r for p, r in zip(*_demo_responses(D.sft_batch(0, 1, 12, cfg, n_demos=12)))}
    assert first == again and any(r.endswith(D.FILLER) for r in first.values())
    # without the habit nothing carries the filler
    none = D.sft_batch(0, 0, 50, D.DataConfig(filler=0.0))
    assert not any(D.FILLER in D.decode(row, stop_at_eos=False) for row in none["full"].tolist())
    rng = random.Random(0)
    assert D.demonstration(rng, D.DataConfig(filler=1.0)).answer.endswith(D.FILLER)
    assert D.FILLER in D.VOCAB and D.VOCAB_SIZE == len(D.VOCAB)


def _demo_responses(b):
    return b["prompts"], [D.decode([t for t in row if t != D.IGNORE]) for row in b["y_resp"].tolist()]
