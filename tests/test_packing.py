"""Packing: samples packed into one row never attend to each other.

transformers builds a block-diagonal causal mask from position_ids that restart at 0, but only
when no 2D attention_mask and no KV cache are passed (masking_utils'
_preprocess_mask_arguments and find_packed_sequence_indices); collate
therefore gives packed blocks position_ids and no mask. Checked for SDPA and eager attention:
each packed sample's summed token loss equals its loss alone, to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures_tiny import make_spec, make_trainer, pairs_records, text_records, write_jsonl
from baton.training.encode import IGNORE, Encoder, collate, pack


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def token_losses(model, batch) -> torch.Tensor:
    """[rows, positions] loss of each label (0 where ignored), after the causal shift."""
    with torch.no_grad():
        # No KV cache: transformers reads packing from position_ids only without one (the
        # trainer turns the cache off too).
        logits = model(**{k: v for k, v in batch.items() if k != "labels"},
                       use_cache=False).logits
    labels = batch["labels"][:, 1:]
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE, reduction="none")
    return flat.view(labels.shape)


def test_pack_keeps_samples_whole_and_restarts_positions(tokenizer):
    samples = [Encoder(tokenizer, "text", 64)(r) for r in text_records(6)]
    blocks = pack(samples, 64)
    assert [t for b in blocks for t in b.input_ids] == [t for s in samples for t in s.input_ids]
    assert all(len(b.input_ids) <= 64 for b in blocks) and len(blocks) < len(samples)
    starts = [i for b in blocks for i, p in enumerate(b.position_ids) if p == 0]
    assert len(starts) == len(samples)  # one restart per sample, none cut in two
    # Every sample's first token carries no label, so no loss crosses a seam.
    assert all(b.labels[i] == IGNORE for b in blocks for i, p in enumerate(b.position_ids)
               if p == 0)
    assert sum(b.label_tokens for b in blocks) == sum(s.label_tokens for s in samples)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked(tiny_model_dir, tokenizer, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    encoder = Encoder(tokenizer, "pairs", 64)
    samples = [encoder(r) for r in pairs_records(7)]
    blocks = pack(samples, 40)
    assert any(b.position_ids.count(0) > 1 for b in blocks)  # the test packs for real
    packed = collate(blocks, tokenizer.pad_token_id)
    assert "attention_mask" not in packed and "position_ids" in packed
    packed_losses = token_losses(model, packed)
    got = []
    for row, block in enumerate(blocks):
        starts = [i for i, p in enumerate(block.position_ids) if p == 0] + [len(block.input_ids)]
        # Token i's loss sits at i - 1 after the shift.
        got += [float(packed_losses[row, a: b - 1].sum()) for a, b in zip(starts, starts[1:])]
    alone = [float(token_losses(model, collate([s], tokenizer.pad_token_id)).sum())
             for s in samples]
    assert got == pytest.approx(alone, abs=1e-5, rel=1e-5)
    # Without the position_ids the samples would see each other: the check can fail.
    leaky = dict(packed, position_ids=None, attention_mask=torch.ones_like(packed["input_ids"]))
    assert not torch.allclose(token_losses(model, leaky), packed_losses, atol=1e-4)


def test_engine_eval_loss_is_the_same_packed_or_not(tiny_model_dir, tmp_path):
    """Through the trainer (patched reference kernels, 4-bit base): the mean held-out token
    loss of packed blocks equals the unpacked samples'."""
    data = write_jsonl(tmp_path / "train.jsonl", pairs_records(24))
    losses = []
    for packing in (False, True):
        spec = make_spec(tiny_model_dir, data, packing=packing, eval_=0.25, max_steps=1)
        losses.append(make_trainer(spec, data, micro=3, kernels="auto").evaluate())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
