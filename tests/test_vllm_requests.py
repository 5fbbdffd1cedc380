"""What the eval job asks vLLM for, tested WITHOUT vLLM installed (it needs a GPU image).

Engine arguments, LoRA requests and sampling parameters are plain data built by
`loraforge.engines.vllm_engine`; the last tests hand them to a stand-in `vllm` module that
records the calls. The real engine runs wherever a GPU with the `vllm` extra exists.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from loraforge import adapters, engines, store
from loraforge.adapters import Adapter
from loraforge.engines import vllm_engine
from loraforge.errors import PermanentError


def lora(label: str, r: int = 8, **config: Any) -> Adapter:
    return Adapter(
        f"s3://bkt/runs/{label}",
        label,
        Path(f"/cache/{label}"),
        b"{}",
        {"peft_type": "LORA", "r": r, **config},
    )


BASE = Adapter("base", "base")


@pytest.mark.parametrize(
    ("rank", "rounded"),
    [
        (1, 1),
        (2, 8),
        (4, 8),
        (8, 8),
        (9, 16),
        (48, 64),
        (64, 64),
        (200, 256),
        (300, 320),
        (512, 512),
    ],
)
def test_max_lora_rank_is_rounded_up_to_what_vllm_accepts(rank: int, rounded: int) -> None:
    assert vllm_engine.round_lora_rank(rank) == rounded
    assert rounded in vllm_engine.MAX_LORA_RANKS


def test_a_rank_above_512_is_refused() -> None:
    with pytest.raises(PermanentError, match="rank 513 is above vLLM's largest"):
        vllm_engine.round_lora_rank(513)


def test_engine_args_size_lora_slots_for_every_adapter() -> None:
    scored = [
        BASE,
        lora("train", r=4),
        lora("edit", r=16, rank_pattern={"q_proj": 48}),
        lora("x", r=8),
    ]
    args = vllm_engine.engine_args("/models/qwen", "abc123", scored, torch.bfloat16, 1234, 0.85)
    assert args["enable_lora"] is True
    assert args["max_lora_rank"] == 64  # the largest rank anywhere (48 in a rank_pattern), rounded
    assert args["max_loras"] == 3  # every adapter resident at once; `base` needs no slot
    assert (args["model"], args["tokenizer"], args["revision"]) == (
        "/models/qwen",
        "/models/qwen",
        "abc123",
    )
    assert (args["dtype"], args["seed"], args["gpu_memory_utilization"]) == ("bfloat16", 1234, 0.85)
    assert args["trust_remote_code"] is False


def test_base_only_needs_no_lora_support() -> None:
    args = vllm_engine.engine_args("/m", None, [BASE], torch.float16, 0, 0.9)
    assert "enable_lora" not in args and "max_loras" not in args and args["dtype"] == "float16"


def test_lora_requests_have_distinct_ids_from_1_and_none_for_base() -> None:
    requests = vllm_engine.lora_requests([BASE, lora("train"), lora("edit")])
    assert requests == {
        "base": None,
        "train": ("train", 1, "/cache/train"),
        "edit": ("edit", 2, "/cache/edit"),
    }


def test_sampling_is_greedy_and_stops_like_lm_eval() -> None:
    args = vllm_engine.sampling_args(200, [5, 2], seed=7)
    assert args == {
        "temperature": 0.0,
        "max_tokens": 200,
        "stop": ["Question:"],
        "stop_token_ids": [2, 5],
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "seed": 7,
    }


# --- which engine -------------------------------------------------------------------------------


def test_dora_is_refused_for_vllm_and_routed_to_transformers_under_auto() -> None:
    scored = [BASE, lora("train"), lora("edit", use_dora=True)]
    with pytest.raises(
        PermanentError, match=r"cannot serve edit: it is a DoRA adapter \(use_dora\)"
    ):
        engines.choose("vllm", scored, has_vllm=True, has_cuda=True)
    engine, why = engines.choose("auto", scored, has_vllm=True, has_cuda=True)
    assert engine == "transformers" and "DoRA" in why
    assert engines.choose("auto", scored[:2], has_vllm=True, has_cuda=True)[0] == "vllm"


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_saved_embeddings_or_head_are_refused_for_vllm(saved: list[str]) -> None:
    scored = [lora("train", modules_to_save=saved)]
    with pytest.raises(PermanentError, match=f"it saves whole modules \\({', '.join(saved)}"):
        engines.choose("vllm", scored, has_vllm=True, has_cuda=True)
    assert engines.choose("auto", scored, has_vllm=True, has_cuda=True)[0] == "transformers"


def test_vllm_needs_to_be_installed_and_a_gpu() -> None:
    with pytest.raises(PermanentError, match="LORAFORGE_ENGINE=vllm but vLLM is not installed"):
        engines.choose("vllm", [BASE], has_vllm=False, has_cuda=True)
    with pytest.raises(PermanentError, match="LORAFORGE_ENGINE=vllm needs a CUDA GPU"):
        engines.choose("vllm", [BASE], has_vllm=True, has_cuda=False)
    assert engines.choose("auto", [BASE], has_vllm=False, has_cuda=True) == (
        "transformers",
        "vLLM is not installed",
    )


def test_a_real_dora_artifact_is_recognised(tiny_kit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    get_peft_model(model, config).save_pretrained(tmp_path / "dora")
    store.publish(tmp_path / "dora", str(tmp_path / "store/dora"), job="train", run_id="d")
    (found,) = adapters.resolve([str(tmp_path / "store/dora")])
    assert found.uses_dora and found.max_rank == 4
    assert adapters.vllm_obstacles(found) == ["dora: it is a DoRA adapter (use_dora)"]
    # the meta-device base (vLLM's pre-check, no weights loaded) accepts it
    adapters.check_fits(found, adapters.meta_model(str(tiny_kit.model_dir), None), "tiny")


# --- the requests, handed to a stand-in vllm module -----------------------------------------------


@dataclass
class FakeOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: object


@dataclass
class FakeLLM:
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.calls = kwargs, []
        FAKE_ENGINES.append(self)

    def generate(
        self, prompts: list[Any], params: list[Any], lora_request: list[Any], use_tqdm: bool
    ) -> list[Any]:
        self.calls.append({"prompts": prompts, "params": params, "lora": lora_request})
        outputs = []
        for prompt, lora_req in zip(prompts, lora_request, strict=True):
            name = "base" if lora_req is None else lora_req.lora_name
            text = f" {name} saw {len(prompt['prompt_token_ids'])} tokens\n#### 1"
            outputs.append(
                types.SimpleNamespace(outputs=[FakeOutput(text, [1, 2, 3], "stop", "Question:")])
            )
        return outputs


FAKE_ENGINES: list[FakeLLM] = []


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[FakeLLM]:
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM  # type: ignore[attr-defined]
    vllm.SamplingParams = lambda **kw: kw  # type: ignore[attr-defined]
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    FAKE_ENGINES.clear()
    return FAKE_ENGINES


def test_one_engine_serves_every_adapter_in_one_batch_of_requests(fake_vllm: list[FakeLLM]) -> None:
    scored = [BASE, lora("train", r=4), lora("edit", r=4)]
    args = vllm_engine.engine_args("/m", None, scored, torch.bfloat16, 1, 0.9)
    engine = vllm_engine.VllmEngine(args, [2, 5], seed=1)
    prompts = [[1, 10, 11], [1, 12], [1, 13, 14, 15]]
    done: list[tuple[int, int]] = []
    results = engine.generate(scored, prompts, [50, 60, 70], lambda n, t: done.append((n, t)))

    (llm,) = fake_vllm
    assert llm.kwargs["max_loras"] == 2 and llm.kwargs["max_lora_rank"] == 8
    (call,) = llm.calls  # one generate call: vLLM interleaves all adapters
    assert [p["prompt_token_ids"] for p in call["prompts"]] == prompts * 3
    assert [p["max_tokens"] for p in call["params"]] == [50, 60, 70] * 3
    assert all(p["temperature"] == 0.0 and p["stop"] == ["Question:"] for p in call["params"])
    assert call["lora"][:3] == [None] * 3
    assert {(r.lora_name, r.lora_int_id, r.lora_path) for r in call["lora"][3:]} == {
        ("train", 1, "/cache/train"),
        ("edit", 2, "/cache/edit"),
    }
    assert [g.text for g in results["edit"]] == [
        f" edit saw {len(p)} tokens\n#### 1" for p in prompts
    ]
    assert results["base"][0].finish == "stop" and results["base"][0].tokens == 3
    assert done == [(9, 27)]


def test_the_eval_job_drives_vllm_with_the_same_prompts(
    fake_vllm: list[FakeLLM],
    tiny_kit,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole job with LORAFORGE_ENGINE=vllm, a stand-in vllm and a pretend GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge import eval as eval_job
    from loraforge import gsm8k
    from loraforge.runner import run_job
    from loraforge.settings import EvalSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_kit.model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "a"
    )
    store.publish(tmp_path / "a", str(tmp_path / "runs/a/train"), job="train", run_id="a")
    env = {
        "LORAFORGE_BASE_MODEL": str(tiny_kit.model_dir),
        "LORAFORGE_ADAPTERS": f"base,{tmp_path / 'runs/a/train'}",
        "LORAFORGE_EVAL_DATA": str(tiny_kit.test),
        "LORAFORGE_FEWSHOT_DATA": str(tiny_kit.train),
        "LORAFORGE_EVAL_LIMIT": "6",
        "LORAFORGE_ENGINE": "vllm",
        "LORAFORGE_STORE": str(tmp_path / "store"),
        "LORAFORGE_RUN_ID": "v",
        "LORAFORGE_LOG_FORMAT": "json",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(engines, "vllm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert run_job(EvalSettings, eval_job.run) == 0

    (llm,) = fake_vllm
    assert (llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"], llm.kwargs["dtype"]) == (
        8,
        1,
        "bfloat16",
    )
    (call,) = llm.calls
    tokenizer = AutoTokenizer.from_pretrained(tiny_kit.model_dir)
    problems = gsm8k.load_problems(str(tiny_kit.test), limit=6, seed=1234)
    pool = gsm8k.load_shots(str(tiny_kit.train))
    sampler = gsm8k.ShotSampler(pool, 5, 1234)
    want = [
        gsm8k.encode_prompt(p, [pool[i] for i in sampler.draw(p)], tokenizer, False)
        for p in problems
    ]
    assert [p["prompt_token_ids"] for p in call["prompts"]] == want * 2
    assert [p["max_tokens"] for p in call["params"]] == [min(512, 512 - len(w)) for w in want] * 2
    assert call["params"][0]["stop_token_ids"] == [2, 5]  # </s> and <|im_end|>
    metrics = json.loads((tmp_path / "store/v/eval/metrics.json").read_text())
    assert metrics["engine"] == "vllm" and metrics["problems"] == 6
