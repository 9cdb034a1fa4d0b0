"""The head hook (rlpost.batch.HeadFn): a loss over the whole vocabulary at every position, computed
chunk by chunk inside the output head, equals the same loss from full [N, T, V] logits, under autograd
and under StreamBP, and never sees more than one chunk of positions at a time."""
import functools

import torch

from rlpost.batch import head_outputs, hf_decoder, pack
from rlpost.streambp import streamed_decoder
from rollout.types import FinishReason, Sample
from test_streambp import spec_model, true_float64_norms  # noqa: F401 - fixture


def _batch():
    g = torch.Generator().manual_seed(1)
    samples = []
    for p_len, r_len in ((3, 7), (5, 4), (2, 9)):  # left- and right-padding both occur
        prompt = torch.randint(3, 50, (p_len,), generator=g).tolist()
        response = torch.randint(3, 50, (r_len,), generator=g).tolist()
        samples.append(Sample(prompt, response, [0.0] * r_len, FinishReason.STOP))
    return pack(samples, pad_id=0)


def _reverse_kl_head(teacher_logp: torch.Tensor, widths: list[int]):
    """KL(pi_student || pi_teacher) at each position, the teacher's log-probs indexed by the chunk's positions."""
    def head(logits, targets, at):
        widths.append(logits.shape[0])
        logp = torch.log_softmax(logits, -1)
        return {"kl": (logp.exp() * (logp - teacher_logp[at])).sum(-1)}
    return head


def _full_logits_loss(model, batch, teacher_logp):
    P, T = batch.prompt_width, batch.response_mask.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits[:, P - 1:P - 1 + T]
    logp = torch.log_softmax(logits, -1)
    return ((logp.exp() * (logp - teacher_logp)).sum(-1) * batch.response_mask).sum()


def test_vocabulary_wide_loss_is_exact_in_chunks_under_autograd_and_streambp(true_float64_norms):
    model, teacher = spec_model(0), spec_model(1)
    batch = _batch()
    P, T = batch.prompt_width, batch.response_mask.shape[1]
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                 position_ids=batch.position_ids).logits[:, P - 1:P - 1 + T], -1)

    def loss_and_grads(loss):
        model.zero_grad()
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    expected = loss_and_grads(_full_logits_loss(model, batch, teacher_logp))
    real = int(batch.response_mask.sum())  # 7 + 4 + 9 = 20 response tokens
    for decoder in (hf_decoder, functools.partial(streamed_decoder, chunk_size=4)):
        for chunk in (4, T, 64):  # 4 and 9 do not divide 20; 64 holds the whole micro-batch
            widths: list[int] = []
            out = head_outputs(model, batch, _reverse_kl_head(teacher_logp, widths), chunk_size=chunk, decoder=decoder)
            assert float(out["kl"][batch.response_mask == 0].abs().sum()) == 0.0  # padding is never scored
            got = loss_and_grads((out["kl"] * batch.response_mask).sum())
            # the head saw the real tokens only, one chunk at a time (no [T, vocab] tensor); with more
            # than one chunk each is recomputed in backward, a single chunk is kept instead
            parts = [min(chunk, real - start) for start in range(0, real, chunk)]
            assert sorted(widths) == sorted(parts * (2 if len(parts) > 1 else 1))
            assert abs(got[0] - expected[0]) <= 1e-10 * abs(expected[0])
            for g, e in zip(got[1], expected[1]):
                assert float((g - e).norm()) <= 1e-10 * float(e.norm()) + 1e-14
