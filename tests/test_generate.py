"""KV-cache decoding against full forwards; greedy / sampling / beam search semantics.

References here are built independently of model/generate.py: full-sequence forwards of
`masks.blank_infilling_example` (Part A, then "<sop> generated"), no cache, no padding."""
import math

import pytest
import torch

from model import GLM, GLMConfig
from model.generate import (GenerationConfig, decode_step, filter_logits, generate, prefill,
                            prepare_prompts)
from model.masks import blank_infilling_example

PAD, EOS, SOP, GMASK, EN = 0, 1, 2, 3, 4
PROMPTS = [[EN, 11, 12, 13, GMASK], [EN, 20, GMASK], [EN, 30, 31, 32, 33, 34, 35, GMASK]]


@pytest.fixture(scope="module")
def model():
    # init_std 0.3 gives peaked next-token distributions (max prob ~0.1-0.5), so greedy,
    # sampling and beam search actually disagree; the default 0.02 is near uniform
    return GLM.build(GLMConfig.preset("tiny", init_std=0.3), seed=0).eval()


def full_forward(model, part_a, gen, mask_index=None, labels=False):
    """Logits [s, V] (or per-token losses [s] against gen + [EOS]) of Part A + <sop> + gen
    in one uncached forward."""
    mask_index = len(part_a) - 1 if mask_index is None else mask_index
    ex = blank_infilling_example(part_a, [(mask_index, gen)], SOP, EOS)
    ids = torch.tensor([ex.input_ids])
    out = model(ids, position_ids=torch.tensor([ex.position_ids]),
                block_position_ids=torch.tensor([ex.block_position_ids]),
                prefix_lens=torch.tensor([ex.prefix_len]),
                labels=torch.tensor([ex.labels]) if labels else None)
    return out[0]


def naive_greedy(model, part_a, max_new, eos, mask_index=None):
    gen = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(full_forward(model, part_a, gen, mask_index)[-1].argmax())
            if nxt == eos:
                break
            gen.append(nxt)
    return gen


def total_log_prob(model, part_a, gen, max_new):
    """log p(gen, then eos unless the budget ran out) under the model."""
    with torch.no_grad():
        losses = full_forward(model, part_a, gen, labels=True)[len(part_a):]
    if len(gen) == max_new:  # stopped by the budget: no eos was scored
        losses = losses[:-1]
    return -float(losses.sum())


def test_cached_decoding_matches_full_forward(model):
    part_a, gen = [EN, 40, 41, 42, 43, GMASK], [50, 51, 52, 53, 54]
    with torch.no_grad():
        full = full_forward(model, part_a, gen)  # [s, V]
        batch = prepare_prompts([part_a], PAD, SOP)
        cache = model.new_kv_cache(1, batch.width + len(gen))
        steps = [prefill(model, batch, cache)[0]]
        for t in gen:
            steps.append(decode_step(model, torch.tensor([t]), batch, cache)[0])
        causal = model(torch.tensor([part_a + [SOP] + gen]))[0]  # same ids, no prefix / 2D
    cached = torch.stack(steps)  # predictions at <sop> and every generated token
    torch.testing.assert_close(cached, full[len(part_a):], atol=1e-4, rtol=1e-4)
    # the comparison is sensitive to the prefix mask and the 2D positions
    assert (causal[len(part_a):] - full[len(part_a):]).abs().max() > 1e-2
    assert cache.length == len(part_a) + 1 + len(gen)


def test_left_padded_batch_matches_rows_alone(model):
    gens = [[60, 61, 62], [70, 71, 72], [80, 81, 82]]
    with torch.no_grad():
        batch = prepare_prompts(PROMPTS, PAD, SOP)
        assert batch.pad_lens.tolist() == [3, 5, 0]
        assert batch.prefix_lens.tolist() == [8, 8, 8]  # pad + len(Part A), absolute
        cache = model.new_kv_cache(3, batch.width + 3)
        batched = [prefill(model, batch, cache)]
        for k in range(3):
            toks = torch.tensor([g[k] for g in gens])
            batched.append(decode_step(model, toks, batch, cache))
        batched = torch.stack(batched, dim=1)  # [b, steps, V]
        for r, (p, g) in enumerate(zip(PROMPTS, gens)):
            alone = full_forward(model, p, g)[len(p):]
            torch.testing.assert_close(batched[r], alone, atol=1e-4, rtol=1e-4)


def test_greedy_equals_argmax_of_full_forwards(model):
    free = [naive_greedy(model, p, 8, eos=-1) for p in PROMPTS]
    # make row 0 stop early: its 4th token becomes eos
    eos = free[0][3]
    assert eos not in free[0][:3]
    want = [naive_greedy(model, p, 8, eos=eos) for p in PROMPTS]
    got = generate(model, PROMPTS, 8, eos_id=eos, pad_id=PAD, sop_id=SOP)
    assert got == want
    assert len(got[0]) == 3 and all(len(g) <= 8 for g in got)
    # prompts given with their <sop> already give the same result
    assert generate(model, [p + [SOP] for p in PROMPTS], 8, eos, PAD, SOP) == want


def test_mask_token_inside_part_a_sets_generated_position(model):
    part_a = [EN, 90, GMASK, 91, 92]
    batch = prepare_prompts([part_a], PAD, SOP, mask_id=GMASK)
    assert batch.gen_position.tolist() == [2]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2]
    assert batch.block_position_ids[0].tolist() == [0, 0, 0, 0, 0, 1]
    want = naive_greedy(model, part_a, 5, eos=EOS, mask_index=2)
    assert generate(model, [part_a], 5, EOS, PAD, SOP, mask_id=GMASK) == [want]
    with pytest.raises(ValueError, match="no mask token"):
        prepare_prompts([[EN, 5]], PAD, SOP, mask_id=GMASK)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPTS, 6, EOS, PAD, SOP)
    a = generate(model, PROMPTS, 6, EOS, PAD, SOP, mode="sample", seed=7)
    b = generate(model, PROMPTS, 6, EOS, PAD, SOP, mode="sample", seed=7)
    c = generate(model, PROMPTS, 6, EOS, PAD, SOP, mode="sample", seed=8)
    assert a == b
    assert a != c and a != greedy
    assert generate(model, PROMPTS, 6, EOS, PAD, SOP, mode="sample", top_k=1,
                    temperature=2.0, seed=3) == greedy
    assert generate(model, PROMPTS, 6, EOS, PAD, SOP, mode="sample", top_p=1e-6,
                    seed=3) == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda x: torch.isfinite(x).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.75)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.85)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_p=0.1)) == [0]
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [0, 1]
    # order-independent: shuffled logits keep the same tokens
    perm = torch.tensor([2, 0, 3, 1])
    assert kept(filter_logits(logits[perm], top_p=0.75)) == [1, 3]
    assert torch.equal(filter_logits(logits), logits)


def test_beam_search_with_one_beam_is_greedy(model):
    greedy = generate(model, PROMPTS, 8, EOS, PAD, SOP)
    assert generate(model, PROMPTS, 8, EOS, PAD, SOP, mode="beam", num_beams=1) == greedy
    # with an eos that is reached, and no length normalisation, still greedy
    eos = greedy[1][2]
    greedy_eos = generate(model, PROMPTS, 8, eos, PAD, SOP)
    assert len(greedy_eos[1]) == 2
    assert generate(model, PROMPTS, 8, eos, PAD, SOP, mode="beam", num_beams=1,
                    length_penalty=0.0) == greedy_eos


def test_beam_search_finds_at_least_greedy_log_prob(model):
    max_new = 6
    greedy = generate(model, PROMPTS, max_new, EOS, PAD, SOP)
    beams = generate(model, PROMPTS, max_new, EOS, PAD, SOP, mode="beam", num_beams=4,
                     length_penalty=0.0)
    gains = []
    for p, g, b in zip(PROMPTS, greedy, beams):
        lg, lb = total_log_prob(model, p, g, max_new), total_log_prob(model, p, b, max_new)
        assert lb >= lg - 1e-4, (p, g, b, lg, lb)
        gains.append(lb - lg)
    assert max(gains) > 1e-3  # beam search found something better than greedy somewhere
    # the batched (left-padded, B*K cache rows) search equals each prompt searched alone
    for p, b in zip(PROMPTS, beams):
        assert generate(model, [p], max_new, EOS, PAD, SOP, mode="beam", num_beams=4,
                        length_penalty=0.0) == [b]


def test_beam_search_stops_at_eos_with_length_penalty(model):
    # make eos the greedy 2nd token of prompt 0: finished hypotheses must come back
    # without the eos, and never longer than the budget
    eos = generate(model, PROMPTS, 3, EOS, PAD, SOP)[0][1]
    out = generate(model, PROMPTS, 5, eos, PAD, SOP, mode="beam", num_beams=3,
                   length_penalty=1.0)
    assert all(eos not in o and len(o) <= 5 for o in out)
    for p, o in zip(PROMPTS, out):
        assert math.isfinite(total_log_prob(model, p, o, 5))


def test_beam_search_keeps_searching_while_a_live_beam_can_win(model):
    # eos = greedy's 2nd token: the single beam finishes "t1 <eos>" at length 2 but lives on
    # through the runner-up token; a length penalty of 2 favours the long hypothesis, so
    # the search must not stop at its first finished hypothesis
    greedy = generate(model, PROMPTS[:1], 8, EOS, PAD, SOP)[0]
    eos = greedy[1]
    short = generate(model, PROMPTS[:1], 8, eos, PAD, SOP)[0]
    assert short == greedy[:1]
    out = generate(model, PROMPTS[:1], 8, eos, PAD, SOP, mode="beam", num_beams=1,
                   length_penalty=2.0)[0]
    assert len(out) == 8 and out[0] == short[0]
    p = PROMPTS[0]
    assert total_log_prob(model, p, out, 8) / 8 ** 2 > total_log_prob(model, p, short, 8) / 2 ** 2


def test_generate_restores_mode_and_validates(model):
    model.train()
    try:
        generate(model, PROMPTS[:1], 2, EOS, PAD, SOP)
        assert model.training
    finally:
        model.eval()
    assert generate(model, PROMPTS, 0, EOS, PAD, SOP) == [[], [], []]
    with pytest.raises(ValueError, match="mode="):
        generate(model, PROMPTS, 2, EOS, PAD, SOP, mode="nucleus")
    with pytest.raises(ValueError, match="top_p="):
        generate(model, PROMPTS, 2, EOS, PAD, SOP, mode="sample", top_p=0.0)
    with pytest.raises(ValueError, match="temperature="):
        GenerationConfig(mode="sample", temperature=0.0)
    with pytest.raises(ValueError, match="prompt 1 has no Part A"):
        generate(model, [[EN, GMASK], [SOP]], 2, EOS, PAD, SOP)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[EN, 5000, GMASK]], 2, EOS, PAD, SOP)
    with pytest.raises(ValueError, match="eos_id="):
        generate(model, PROMPTS, 2, -1, PAD, SOP)
    stage = GLM.build(model.config, seed=0, layer_range=(0, 2), post_process=False)
    with pytest.raises(ValueError, match="pipeline stage"):
        generate(stage, PROMPTS, 2, EOS, PAD, SOP)


def test_padded_vocabulary_rows_are_never_generated():
    from model import GLM, GLMConfig
    from model.generate import generate
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    with torch.no_grad():  # make the padding rows the model's favourite tokens
        model.output_layer.weight[900:] *= 50
    prompts = [[5, 6, 7, 3], [9, 3]]
    free = generate(model, prompts, 6, eos_id=999, pad_id=0, sop_id=4, mask_id=3)
    assert any(t >= 900 for row in free for t in row)
    for mode in ("greedy", "beam"):
        out = generate(model, prompts, 6, eos_id=999, pad_id=0, sop_id=4, mask_id=3,
                       mode=mode, vocab_size=900)
        assert all(t < 900 for row in out for t in row), out


def test_logits_to_keep_is_the_last_columns_of_the_full_head(model):
    # prefill reads one column: the head on it alone equals that column of the full
    # logits, and a forward hook (a logit processor) still sees the call
    ids = torch.randint(0, model.config.padded_vocab_size, (2, 9),
                        generator=torch.Generator().manual_seed(3))
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            full, last = model(ids), model(ids, logits_to_keep=1)
            two = model(ids, logits_to_keep=2)
    finally:
        handle.remove()
    assert last.shape == (2, 1, model.config.padded_vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, full[:, -2:], rtol=1e-5, atol=1e-5)
    assert len(seen) == 3
