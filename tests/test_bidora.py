"""BiDoRA on the tiny model (CPU): the hypergradient against references, exact restoration of
the perturbed direction, checkpoint resume, and the published PEFT DoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraforge import bidora, packing, store, train
from loraforge.data import Example
from loraforge.runner import JobContext
from loraforge.settings import TrainSettings, load_settings
from tests.test_train import adapter_tensors, run_job_subprocess, spec


def dora_model(kit, dtype: torch.dtype = torch.float64) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    base = AutoModelForCausalLM.from_pretrained(
        kit.model_dir, dtype=dtype, attn_implementation="eager"
    )
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    model = get_peft_model(base, config)
    with torch.no_grad():  # move off the B = 0 start so every term of the hypergradient lives
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            if bidora.MAGNITUDE in name:
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
    return model.eval()


def batch_of(examples: list[Example]) -> packing.Batch:
    return packing.collate_padded(examples, 0)


@pytest.fixture(scope="module")
def setup(tiny_kit):  # type: ignore[no-untyped-def]
    from loraforge import data
    from loraforge.modeling import load_tokenizer

    settings = load_settings(
        TrainSettings,
        {"LORAFORGE_BASE_MODEL": str(tiny_kit.model_dir), "LORAFORGE_DATA": str(tiny_kit.train)},
    )
    tokenizer = load_tokenizer(str(tiny_kit.model_dir), settings)
    records = data.read_records(str(tiny_kit.train))[:6]
    examples = data.tokenize(records, tokenizer, 256, str(tiny_kit.train))
    model = dora_model(tiny_kit)
    direction, magnitude = bidora.split_parameters(model)
    return model, direction, magnitude, [batch_of(examples[:3])], [batch_of(examples[3:])]


def unrolled_objective(model, direction, train_b, val_b, xi: float) -> float:  # type: ignore[no-untyped-def]
    """F(m) = L_val(w - ξ∇w L_train(w, m), m), evaluated the slow, obvious way, with the DoRA
    norm held at its value for w (the function PEFT's backward differentiates)."""
    with bidora.frozen_dora_norms(model):
        return _unrolled(model, direction, train_b, val_b, xi)


def _unrolled(model, direction, train_b, val_b, xi: float) -> float:  # type: ignore[no-untyped-def]
    saved = [p.detach().clone() for p in direction]
    grads = torch.autograd.grad(bidora.mean_loss(model, train_b), direction)
    with torch.no_grad():
        for p, g in zip(direction, grads, strict=True):
            p.sub_(xi * g)
        value = float(bidora.mean_loss(model, val_b))
        for p, s in zip(direction, saved, strict=True):
            p.copy_(s)
    return value


def test_second_order_hypergradient_matches_finite_differences_of_the_unrolled_objective(
    setup,  # type: ignore[no-untyped-def]
) -> None:
    model, direction, magnitude, train_b, val_b = setup
    xi = 0.5  # large enough that the second-order term is far above the finite-difference error
    hyper, _ = bidora.hypergradient(
        model, direction, magnitude, train_b, val_b, order="second_order", xi=xi
    )
    direct, _ = bidora.hypergradient(
        model, direction, magnitude, train_b, val_b, order="first_order", xi=xi
    )
    generator = torch.Generator().manual_seed(3)
    # the tiny Llama runs RMSNorm and softmax in fp32 even in an fp64 model: h balances that
    # rounding against the O(h²) error of the central difference
    h = 3e-5
    for _ in range(3):  # three random directions d in magnitude space
        d = [torch.randn(m.shape, generator=generator, dtype=m.dtype) for m in magnitude]
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for m, dm in zip(magnitude, d, strict=True):
                    m.add_(sign * h * dm)
            values.append(unrolled_objective(model, direction, train_b, val_b, xi))
            with torch.no_grad():
                for m, dm in zip(magnitude, d, strict=True):
                    m.sub_(sign * h * dm)
        reference = (values[0] - values[1]) / (2 * h)
        ours = sum(float((g * dm).sum()) for g, dm in zip(hyper, d, strict=True))
        first = sum(float((g * dm).sum()) for g, dm in zip(direct, d, strict=True))
        relative = abs(ours - reference) / abs(reference)
        print(f"d/dm F along d: reference {reference:.8f}, ours {ours:.8f} (rel {relative:.1e})")
        assert relative < 5e-3
        # and the second-order term matters: the direct gradient alone is far off
        assert abs(first - reference) > 20 * abs(ours - reference)


def test_first_order_is_the_direct_gradient_and_nothing_is_left_behind(setup) -> None:  # type: ignore[no-untyped-def]
    model, direction, magnitude, train_b, val_b = setup
    before = [p.detach().clone() for p in [*direction, *magnitude]]
    hyper, val = bidora.hypergradient(
        model, direction, magnitude, train_b, val_b, order="first_order", xi=0.1
    )
    loss = bidora.mean_loss(model, val_b)
    expected = torch.autograd.grad(loss, magnitude)
    for got, want in zip(hyper, expected, strict=True):
        assert torch.equal(got, want)
    assert val == pytest.approx(float(loss), rel=1e-12)
    bidora.hypergradient(model, direction, magnitude, train_b, val_b, order="second_order", xi=0.1)
    after = [*direction, *magnitude]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # bit-identical
    assert all(p.grad is None for p in after)


def test_orthogonality_regulariser_matches_a_hand_computation() -> None:
    model = torch.nn.Module()
    model.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(3, 2, bias=False)})
    model.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})
    with torch.no_grad():
        model.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]))
        model.lora_B["default"].weight.copy_(torch.zeros(4, 2))
    # A Aᵀ = diag(1, 4): (4-1)² = 9; Bᵀ B = 0: ||-I||² = 2
    assert float(bidora.orthogonality(model)) == pytest.approx(11.0)


def bidora_spec(kit, tmp_path: Path, **overrides: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return spec(kit, tmp_path, LORAFORGE_METHOD="bidora", **overrides)


def test_bidora_trains_both_levels_and_publishes_a_peft_dora_adapter(
    tiny_kit,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    settings = load_settings(
        TrainSettings,
        bidora_spec(tiny_kit, tmp_path, LORAFORGE_BIDORA_LOWER_STEPS="2"),
    )
    trainer = train.build_trainer(settings, JobContext())
    assert isinstance(trainer, bidora.BiDoRATrainer)
    magnitude_before = [p.detach().clone() for p in trainer.magnitude]
    before = trainer.validation_loss()
    trainer.fit()
    assert trainer.state.val_loss is not None and before is not None
    assert trainer.state.val_loss < before - 0.1
    assert trainer.upper_loss is not None
    moved = [
        not torch.equal(a, b) for a, b in zip(trainer.magnitude, magnitude_before, strict=True)
    ]
    assert all(moved)  # the upper level trained every magnitude vector
    train.publish_adapter(trainer)

    artifact = store.fetch(settings.output_uri)
    config = json.loads((artifact.path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    assert not list(artifact.path.glob("*.bin"))
    base = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, artifact.path).eval()
    ids = torch.tensor([trainer.val_set[0].input_ids])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, trainer.model(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_final_phase_keeps_the_magnitude_fixed(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = bidora_spec(
        tiny_kit, tmp_path, LORAFORGE_MAX_STEPS="6", LORAFORGE_BIDORA_FINAL_FRACTION="0.5"
    )
    trainer = train.build_trainer(load_settings(TrainSettings, env), JobContext())
    assert trainer.search_steps == 3  # type: ignore[attr-defined]
    for step in range(3):
        trainer.train_step(step)
    magnitude = [p.detach().clone() for p in trainer.magnitude]  # type: ignore[attr-defined]
    direction = [p.detach().clone() for p in trainer.direction]  # type: ignore[attr-defined]
    for step in range(3, 6):
        trainer.train_step(step)
    assert all(torch.equal(a, b) for a, b in zip(trainer.magnitude, magnitude, strict=True))  # type: ignore[attr-defined]
    assert not any(torch.equal(a, b) for a, b in zip(trainer.direction, direction, strict=True))  # type: ignore[attr-defined]


def test_killed_bidora_run_resumes_to_the_same_weights(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common = {"LORAFORGE_MAX_STEPS": "8", "LORAFORGE_BIDORA_LOWER_STEPS": "2"}
    reference = bidora_spec(tiny_kit, tmp_path, LORAFORGE_RUN_ID="ref", **common)
    assert run_job_subprocess(reference) == 0
    # stop after step 5 (mid-round), leaving the checkpoint of step 4, then resume
    partial = bidora_spec(
        tiny_kit, tmp_path, LORAFORGE_RUN_ID="cut", LORAFORGE_CHECKPOINT_INTERVAL="4", **common
    )
    settings = load_settings(TrainSettings, partial)
    trainer = train.build_trainer(settings, JobContext())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (ONE_THREAD): bit-identity needs one thread
    try:
        _train_five_steps(trainer)
    finally:
        torch.set_num_threads(threads)
    assert run_job_subprocess(partial) == 0
    want = adapter_tensors(str(tmp_path / "store/ref/train"))
    got = adapter_tensors(str(tmp_path / "store/cut/train"))
    assert want.keys() == got.keys() and any("magnitude" in k for k in want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def _train_five_steps(trainer: train.Trainer) -> None:
    for _ in range(5):
        trainer.train_step(trainer.state.step)
        trainer.state.step += 1
        if trainer.state.step == 4:
            trainer.publish_checkpoint()
