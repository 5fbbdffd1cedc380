"""The calibrate-and-edit job on the tiny model: exact sensitivities, edits, artifact, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from loraforge import edit, store, train
from loraforge.errors import EXIT_PERMANENT
from loraforge.runner import JobContext, run_job
from loraforge.settings import EditSettings, TrainSettings, load_settings
from loraforge.spectral.sensitivity import sensitivities

TRAIN = {
    "LORAFORGE_MAX_STEPS": "6",
    "LORAFORGE_LEARNING_RATE": "5e-3",
    "LORAFORGE_DEVICE": "cpu",
    "LORAFORGE_TARGET_MODULES": "q_proj,v_proj,o_proj,down_proj",
    "LORAFORGE_RANK": "8",
    "LORAFORGE_RANK_PATTERN": "down_proj=4",
    "LORAFORGE_ALPHA_PATTERN": "o_proj=8",
    "LORAFORGE_EVAL_INTERVAL": "0",
    "LORAFORGE_CHECKPOINT_INTERVAL": "0",
    "LORAFORGE_CHECKPOINT_SECONDS": "0",
    "LORAFORGE_MAX_SEQ_LEN": "256",
}


@pytest.fixture(scope="module")
def adapter(tiny_kit, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A briefly trained rsLoRA adapter with mixed ranks and alphas (rank/alpha patterns)."""
    root = tmp_path_factory.mktemp("edit-store")
    env = {
        "LORAFORGE_BASE_MODEL": str(tiny_kit.model_dir),
        "LORAFORGE_DATA": str(tiny_kit.train),
        "LORAFORGE_VAL_DATA": str(tiny_kit.val),
        "LORAFORGE_STORE": str(root),
        "LORAFORGE_RUN_ID": "base-adapter",
        **TRAIN,
    }
    trainer = train.build_trainer(load_settings(TrainSettings, env), JobContext())
    trainer.fit()
    train.publish_adapter(trainer)
    return str(root / "base-adapter" / "train")


def edit_env(kit, adapter_uri: str, tmp_path: Path, **overrides: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {
        "LORAFORGE_BASE_MODEL": str(kit.model_dir),
        "LORAFORGE_ADAPTER": adapter_uri,
        "LORAFORGE_CALIB_DATA": str(kit.val),
        "LORAFORGE_CALIB_SAMPLES": "8",
        "LORAFORGE_STORE": str(tmp_path / "store"),
        "LORAFORGE_RUN_ID": "e1",
        "LORAFORGE_DEVICE": "cpu",
        "LORAFORGE_LOG_FORMAT": "json",
        "LORAFORGE_MAX_SEQ_LEN": "256",
        **overrides,
    }


def loaded(kit, settings: EditSettings, adapter_uri: str, dtype=torch.float32):  # type: ignore[no-untyped-def]
    artifact = store.fetch(adapter_uri)
    base = AutoModelForCausalLM.from_pretrained(kit.model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, artifact.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(kit.model_dir)
    records = edit.calibration_sample(settings)
    batches = edit.calibration_batches(settings, tokenizer, records, torch.device("cpu"))
    return model, batches


def test_scale_follows_rslora_and_the_rank_alpha_patterns(tiny_kit, adapter, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(EditSettings, edit_env(tiny_kit, adapter, tmp_path))
    model, _ = loaded(tiny_kit, settings, adapter)
    spectra = edit.spectra_of(edit.select_modules(model, settings))
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"] == {"down_proj": 4}
    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    for name, spectrum in spectra.items():
        short = name.rsplit(".", 1)[-1]
        r = 4 if short == "down_proj" else 8
        alpha = 8.0 if short == "o_proj" else 32.0
        assert spectrum.scale == pytest.approx(alpha / math_sqrt(r))  # α/√r by hand
        B, A = weights[f"{name}.lora_B.weight"], weights[f"{name}.lora_A.weight"]
        assert B.shape[1] == r and spectrum.S.numel() == r
        dense = torch.linalg.svdvals(alpha / math_sqrt(r) * B.double() @ A.double())[:r]
        torch.testing.assert_close(spectrum.S.double(), dense, rtol=1e-5, atol=1e-7)


def math_sqrt(x: float) -> float:
    return float(x) ** 0.5


def test_sensitivity_equals_autograd_on_dense_delta_w_and_finite_differences(
    tiny_kit,
    adapter,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    settings = load_settings(
        EditSettings, edit_env(tiny_kit, adapter, tmp_path, LORAFORGE_CALIB_SAMPLES="4")
    )
    model, batches = loaded(tiny_kit, settings, adapter, dtype=torch.float64)
    modules = edit.select_modules(model, settings)
    spectra = edit.spectra_of(modules)
    g, _, _ = sensitivities(model, spectra, batches)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    name = sorted(spectra)[-1]  # one module, checked two independent ways
    sp = spectra[name]
    U, Vh = sp.U.double(), sp.Vh.double()
    W0 = dict(model.named_parameters())[f"{name}.base_layer.weight"].detach()
    B_key = f"{name}.lora_B.default.weight"
    zero_B = torch.zeros_like(dict(model.named_parameters())[B_key])

    def loss_at(sigma: torch.Tensor) -> torch.Tensor:
        # ΔW(σ) materialised densely into the base weight, the module's own LoRA switched off
        weights = {f"{name}.base_layer.weight": W0 + U @ torch.diag(sigma) @ Vh, B_key: zero_B}
        total = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            logits = functional_call(model, weights, kwargs=batch.model_inputs()).logits
            targets = batch.labels[:, 1:]
            keep = targets != -100
            total = total + torch.nn.functional.cross_entropy(
                logits[:, :-1][keep], targets[keep], reduction="sum"
            )
        return total

    sigma = sp.S.double().clone().requires_grad_(True)
    (g_dense,) = torch.autograd.grad(loss_at(sigma), sigma)
    # g is float32 (σ is a float32 leaf); the dense reference is float64
    torch.testing.assert_close(g[name].double(), g_dense, rtol=2e-5, atol=1e-6)

    # Llama's RMSNorm computes in fp32 even in an fp64 model, so the loss carries ~1e-10
    # relative noise: central differences with a step that dwarfs it, Richardson-extrapolated.
    def central(k: int, h: float) -> float:
        bump = torch.zeros_like(sigma)
        bump[k] = h
        with torch.no_grad():
            return float(loss_at(sp.S.double() + bump) - loss_at(sp.S.double() - bump)) / (2 * h)

    for k in range(sigma.numel()):
        fd = (4 * central(k, 1e-2) - central(k, 2e-2)) / 3
        assert float(g[name][k]) == pytest.approx(fd, rel=2e-3, abs=1e-4)
    # every requires_grad flag is back as it was, and no parametrization is left behind
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_identity_edit_reproduces_the_adapter_outputs(tiny_kit, adapter, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = edit_env(
        tiny_kit,
        adapter,
        tmp_path,
        LORAFORGE_AMP="1",
        LORAFORGE_SUP="1",
        LORAFORGE_MID="1",
        LORAFORGE_TARGET_MODULES="o_proj,down_proj,q_proj,v_proj",
    )
    settings = load_settings(EditSettings, env)
    edit.run(settings, JobContext())
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    base = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)
    original = PeftModel.from_pretrained(base, store.fetch(adapter).path).eval()
    with torch.no_grad():
        want = original(ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)
    edited = PeftModel.from_pretrained(base, store.fetch(settings.output_uri).path).eval()
    with torch.no_grad():
        torch.testing.assert_close(edited(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_edit_publishes_a_new_adapter_that_replays_from_its_meta(
    tiny_kit, adapter, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    before = {p.name: p.read_bytes() for p in Path(adapter).iterdir()}
    settings = load_settings(EditSettings, edit_env(tiny_kit, adapter, tmp_path))
    edit.run(settings, JobContext())
    out = Path(settings.output_uri)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loraforge.json",
        "spectral_edit_meta.json",
        "spectrum.png",
    ]
    assert {p.name: p.read_bytes() for p in Path(adapter).iterdir()} == before  # input untouched
    assert (out / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "spectral_edit_meta.json").read_text())
    manifest = json.loads((out / "loraforge.json").read_text())
    assert meta["input_adapter"]["manifest_sha256"] == manifest["inputs"][0]["manifest_sha256"]
    assert set(meta["params"]) >= {"mode", "core_frac", "amp", "grad_norm", "preserve_energy"}
    names = sorted(meta["modules"])
    assert names and all(n.endswith(("o_proj", "down_proj")) for n in names)
    replayed = edit.replay(meta)
    for name in names:
        assert replayed[name].tolist() == meta["modules"][name]["sigma_new"]  # bit for bit
        assert meta["modules"][name]["sigma_new"] != meta["modules"][name]["sigma"]

    again = load_settings(
        EditSettings, edit_env(tiny_kit, adapter, tmp_path, LORAFORGE_RUN_ID="e2")
    )
    edit.run(again, JobContext())
    meta2 = json.loads((Path(again.output_uri) / "spectral_edit_meta.json").read_text())
    assert {n: m["sigma_new"] for n, m in meta2["modules"].items()} == {
        n: m["sigma_new"] for n, m in meta["modules"].items()
    }

    base = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for name in names:
        B, A = tensors[f"{name}.lora_B.weight"], tensors[f"{name}.lora_A.weight"]
        scale = meta["modules"][name]["scale"]
        S = torch.linalg.svdvals(scale * B.double() @ A.double())[: A.shape[0]]
        want = torch.tensor(meta["modules"][name]["sigma_new"], dtype=torch.float64)
        # an edit can reorder σ (an amplified value may pass a larger one): compare sorted
        torch.testing.assert_close(S, want.sort(descending=True).values, rtol=1e-4, atol=1e-6)
    assert model.peft_config["default"].r == 8


def test_dora_adapter_keeps_its_magnitude(tiny_kit, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "LORAFORGE_BASE_MODEL": str(tiny_kit.model_dir),
        "LORAFORGE_DATA": str(tiny_kit.train),
        "LORAFORGE_VAL_DATA": str(tiny_kit.val),
        "LORAFORGE_STORE": str(tmp_path / "s"),
        "LORAFORGE_RUN_ID": "dora",
        "LORAFORGE_METHOD": "dora",
        **TRAIN,
    }
    trainer = train.build_trainer(load_settings(TrainSettings, env), JobContext())
    trainer.fit()
    train.publish_adapter(trainer)
    uri = str(tmp_path / "s/dora/train")
    settings = load_settings(EditSettings, edit_env(tiny_kit, uri, tmp_path))
    edit.run(settings, JobContext())
    before = load_file(str(Path(uri) / "adapter_model.safetensors"))
    after = load_file(str(Path(settings.output_uri) / "adapter_model.safetensors"))
    magnitudes = [k for k in before if "magnitude" in k]
    assert magnitudes and all(torch.equal(before[k], after[k]) for k in magnitudes)
    meta = json.loads((Path(settings.output_uri) / "spectral_edit_meta.json").read_text())
    assert meta["dora"] and "magnitude vector is kept" in meta["dora_note"]


def _pickle_only(adapter_uri: str, tmp_path: Path) -> str:
    src = Path(adapter_uri)
    dst = tmp_path / "pickled"
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    torch.save({"x": torch.zeros(1)}, dst / "adapter_model.bin")
    store.publish(dst, str(tmp_path / "pickled-art"), job="upload", run_id="x")
    return str(tmp_path / "pickled-art")


def _other_base(tiny_kit, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    config = LlamaConfig.from_pretrained(tiny_kit.model_dir)
    config.hidden_size, config.intermediate_size = 64, 128
    other = tmp_path / "other-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_kit.model_dir).save_pretrained(other)
    return str(other)


def _empty(tmp_path: Path) -> str:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    return str(path)


BAD = {
    "adapter not found": (
        lambda k, a, t: {"LORAFORGE_ADAPTER": str(t / "nowhere")},
        "no published artifact",
    ),
    "pickle only": (
        lambda k, a, t: {"LORAFORGE_ADAPTER": _pickle_only(a, t)},
        "holds pickled weights (adapter_model.bin), which are refused",
    ),
    "other base": (
        lambda k, a, t: {"LORAFORGE_BASE_MODEL": _other_base(k, t)},
        "does not fit LORAFORGE_BASE_MODEL",
    ),
    "unknown mode": (
        lambda k, a, t: {"LORAFORGE_EDIT_MODE": "svd_magic"},
        "LORAFORGE_EDIT_MODE=svd_magic: input should be",
    ),
    "unknown parameter": (
        lambda k, a, t: {"LORAFORGE_AMP_FACTOR": "1.5"},
        "did you mean LORAFORGE_AMP?",
    ),
    "fractions over 1": (
        lambda k, a, t: {"LORAFORGE_CORE_FRAC": "0.6", "LORAFORGE_NOISE_FRAC": "0.5"},
        "= 1.1 > 1",
    ),
    "targets absent": (
        lambda k, a, t: {"LORAFORGE_TARGET_MODULES": "gate_proj"},
        "gate_proj not adapted by",
    ),
    "empty calibration": (lambda k, a, t: {"LORAFORGE_CALIB_DATA": _empty(t)}, "no records"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_publishes_nothing(
    tiny_kit,
    adapter,
    tmp_path,
    monkeypatch,
    capsys,
    case,  # type: ignore[no-untyped-def]
) -> None:
    make, expected = BAD[case]
    for name, value in edit_env(
        tiny_kit, adapter, tmp_path, **make(tiny_kit, adapter, tmp_path)
    ).items():
        monkeypatch.setenv(name, value)
    assert run_job(EditSettings, edit.run) == EXIT_PERMANENT
    errors = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("{") and '"error"' in line
    ]
    assert len(errors) == 1 and expected in errors[0]["msg"], errors
    assert not (tmp_path / "store").exists()
