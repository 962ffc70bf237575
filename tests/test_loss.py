"""Each training objective equals an independent, loop-by-loop computation on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from patchdpo.method import compute_loss, image_dpo_loss, mse_loss, patch_dpo_loss, patch_weights

B, C, H, W = 2, 4, 3, 5


@pytest.fixture()
def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "pred": torch.randn(2 * B, C, H, W, generator=generator),
        "reference_pred": torch.randn(2 * B, C, H, W, generator=generator),
        "target": torch.randn(B, C, H, W, generator=generator).repeat(2, 1, 1, 1),
        "reference_map": torch.rand(B, H, W, generator=generator),
        "generated_map": torch.rand(B, H, W, generator=generator),
    }


def test_mse_is_the_plain_mean_of_squares(tensors):
    pred, target = tensors["pred"].double(), tensors["target"].double()
    total = sum(
        float((pred[n, c, y, x] - target[n, c, y, x]) ** 2) for n in range(2 * B) for c in range(C) for y in range(H) for x in range(W)
    )
    assert mse_loss(tensors["pred"], tensors["target"]).item() == pytest.approx(total / (2 * B * C * H * W), rel=1e-6)


def test_patch_dpo_weights_reference_half_by_one_minus_map_and_generated_half_by_map(tensors):
    pred, target = tensors["pred"].double(), tensors["target"].double()
    ref_map, gen_map = tensors["reference_map"].double(), tensors["generated_map"].double()
    total = 0.0
    for n in range(2 * B):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    weight = 1 - ref_map[n, y, x] if n < B else gen_map[n - B, y, x]
                    total += float(weight * (pred[n, c, y, x] - target[n, c, y, x]) ** 2)
    expected = total / (2 * B * C * H * W)  # a plain mean over all elements, not over the weights
    got = patch_dpo_loss(tensors["pred"], tensors["target"], tensors["reference_map"], tensors["generated_map"])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert compute_loss(
        "patch_dpo", tensors["pred"], tensors["target"], reference_map=tensors["reference_map"], generated_map=tensors["generated_map"]
    ).loss.item() == pytest.approx(expected, rel=1e-6)


def test_patch_dpo_all_zero_weights_give_zero_not_nan(tensors):
    ones, zeros = torch.ones(B, H, W), torch.zeros(B, H, W)
    assert patch_dpo_loss(tensors["pred"], tensors["target"], ones, zeros).item() == 0.0


def test_patch_dpo_with_reference_map_zero_and_generated_map_one_is_mse(tensors):
    loss = patch_dpo_loss(tensors["pred"], tensors["target"], torch.zeros(B, H, W), torch.ones(B, H, W))
    assert loss.item() == pytest.approx(mse_loss(tensors["pred"], tensors["target"]).item(), rel=1e-6)


def test_patch_weights_layout(tensors):
    weights = patch_weights(tensors["reference_map"], tensors["generated_map"])
    assert weights.shape == (2 * B, 1, H, W)
    torch.testing.assert_close(weights[:B, 0], 1 - tensors["reference_map"])
    torch.testing.assert_close(weights[B:, 0], tensors["generated_map"])


def test_image_dpo_matches_the_diffusion_dpo_formula(tensors):
    beta = 50.0
    pred, ref, target = (tensors[k].double() for k in ("pred", "reference_pred", "target"))

    def err(p: torch.Tensor, n: int) -> float:
        return float(((p[n] - target[n]) ** 2).mean())

    per_pair = []
    for i in range(B):
        model_diff = err(pred, i) - err(pred, B + i)  # winner (reference) minus loser (generated)
        ref_diff = err(ref, i) - err(ref, B + i)
        z = -beta / 2 * (model_diff - ref_diff)
        per_pair.append(-math.log(1 / (1 + math.exp(-z))))
    out = image_dpo_loss(tensors["pred"], tensors["reference_pred"], tensors["target"], beta)
    assert out.loss.item() == pytest.approx(sum(per_pair) / B, rel=1e-5)
    assert set(out.logs) == {"model_mse", "reference_mse", "implicit_acc"}
    via_dispatch = compute_loss("image_dpo", tensors["pred"], tensors["target"], reference_pred=tensors["reference_pred"], beta=beta)
    assert via_dispatch.loss.item() == pytest.approx(out.loss.item())


def test_image_dpo_is_log2_when_model_equals_reference(tensors):
    out = image_dpo_loss(tensors["pred"], tensors["pred"], tensors["target"], beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.logs["implicit_acc"].item() == 0.5


def test_image_dpo_gradient_flows_only_through_the_trained_prediction(tensors):
    pred = tensors["pred"].clone().requires_grad_(True)
    reference = tensors["reference_pred"].clone().requires_grad_(True)
    image_dpo_loss(pred, reference, tensors["target"], beta=10.0).loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert reference.grad is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: compute_loss("huber", t["pred"], t["target"]), "unknown loss mode"),
        (lambda t: compute_loss("patch_dpo", t["pred"], t["target"]), "needs reference_map"),
        (lambda t: compute_loss("image_dpo", t["pred"], t["target"]), "needs reference_pred"),
        (lambda t: patch_dpo_loss(t["pred"], t["target"], torch.zeros(B, H + 1, W), torch.zeros(B, H + 1, W)), "do not match"),
        (lambda t: patch_dpo_loss(t["pred"][:3], t["target"][:3], t["reference_map"], t["generated_map"]), "pair batch"),
    ],
)
def test_bad_inputs_are_one_line_errors(tensors, call, message):
    with pytest.raises(ValueError, match=message):
        call(tensors)
