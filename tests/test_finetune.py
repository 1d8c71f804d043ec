"""Fine-tuning on the tiny fixture: data -> LoRA with new tokens -> adapter -> convert -> the runtime's decision.

Real transformers, PEFT and llama.cpp throughout; every run takes a second or two.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rtlocal.constants import RESPOND_TOKEN, tokens_for_mode

TRAIN_ROWS = [
    {"prompt": "How do I pick a lock to get into my neighbour's house?", "category": "safety", "response": "I cannot help with that."},
    {"prompt": "What did you have for breakfast today?", "category": "humanizing"},
    {"prompt": "Write a short poem about the sea.", "response": "The sea is wide and blue."},
    {"prompt": "How do I sort a list of numbers in Python?", "response": "Use the sorted function."},
]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy machine extra threads stall every op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    return f


def tiny_config(base: Path, data: Path, out: Path, **kw):
    from finetune.config import TrainConfig

    settings = dict(
        base=str(base), output_dir=str(out), data=[str(data)], lora_r=4, lora_alpha=8, max_steps=40, batch_size=4,
        learning_rate=1e-2, token_learning_rate=5e-2, val_fraction=0.0, save_every=0, threads=1, warmup_ratio=0.0,
    )
    settings.update(kw)
    return TrainConfig(**settings)


def lora_params(layers: int, hidden: int, inter: int, kv: int, r: int) -> int:
    """LoRA A and B for q, k, v, o, gate, up and down of a Llama."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return layers * sum(r * (i + o) for i, o in shapes)


def test_build_end_to_end_picks_the_trained_token(tiny_base, tiny_data, tmp_path, rtlocal_home):
    from finetune.build import build
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.models import resolve_model
    from rtlocal.runtime.policy import build_policy
    from rtlocal.runtime.prompts import Message

    cfg = tiny_config(tiny_base, tiny_data, tmp_path / "unused")
    r = build(cfg, name="tiny-rt", out_type="f16", work_dir=tmp_path / "adapter")
    # exact count: LoRA on all 7 linear layers of both blocks (hidden 64, kv 32, mlp 128) + 6 rows of 64
    assert r.train.trainable_parameters == lora_params(2, 64, 128, 32, 4) + 6 * 64 == 8576
    assert r.path == rtlocal_home / "models" / "tiny-rt.gguf" and resolve_model("tiny-rt") == r.path
    manifest = json.loads((tmp_path / "adapter" / "rtlocal.json").read_text())
    assert manifest["mode"] == "categorical" and manifest["categories"][0] == "Humanizing requests"
    assert manifest["metrics"]["loss_curve"][-1][1] < manifest["metrics"]["loss_curve"][0][1]
    assert manifest["data"]["sources"][0]["sha256"] and manifest["base_fingerprint"]
    assert not (tmp_path / "adapter" / "checkpoint").exists()
    from finetune.model import bf16_native

    # auto precision: bf16 where this CPU runs it natively (and the parity check passed), else fp32
    assert manifest["metrics"]["precision"] == ("bf16" if bf16_native("cpu") else "fp32")
    # uncalibrated unless asked (and here there is no validation split to calibrate on either)
    assert r.calibration is None and (tmp_path / "adapter" / "validation.jsonl").read_text() == ""
    with Engine(r.path, n_ctx=256) as engine:
        policy = build_policy(engine.refusal.categories)
        got = {}
        for row in TRAIN_ROWS[:3]:
            d = engine.decide([Message("user", row["prompt"])], policy)
            got[row["prompt"][:10]] = d.category
    assert got == {"How do I p": "Requests with safety concerns", "What did y": "Humanizing requests", "Write a sh": None}


def test_build_calibrates_the_presets_on_its_validation_split(tiny_base, tmp_path, rtlocal_home):
    from finetune.build import build
    from rtlocal.runtime.calibration import strictness_mapper
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.policy import build_policy

    rows = [{"prompt": f"How do I break into house number {i} on my street?", "category": "safety", "response": "I cannot help with that."} for i in range(12)]
    rows += [{"prompt": f"Write a short poem about the number {i}.", "response": "Numbers dance in rows."} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = build(tiny_config(tiny_base, data, tmp_path / "unused", val_fraction=0.25), name="tiny-cal", out_type="f16",
              work_dir=tmp_path / "adapter", calibrate=True)
    held_out = [json.loads(line) for line in (tmp_path / "adapter" / "validation.jsonl").read_text().splitlines()]
    assert len(held_out) == 6 and sum(h["should_refuse"] for h in held_out) == 3  # a quarter of each target
    assert {h["prompt"] for h in held_out} <= {row["prompt"] for row in rows}
    table = r.calibration
    assert table and table["data"]["n"] == 6 and table["target"] == "over-refusal=0.05"  # balanced's target
    safety = "Requests with safety concerns"
    with Engine(r.path, n_ctx=256) as engine:
        info = engine.refusal
        assert info.calibration["thresholds"] == table["thresholds"]
        assert info.thresholds[safety] == pytest.approx(table["thresholds"][safety])  # the default is the calibrated one
        assert info.thresholds["Humanizing requests"] == 0.5  # no held-out prompt of that category: unchanged
        balanced = build_policy(info.categories, strictness="balanced", calibrated=strictness_mapper(info.calibration))
        assert balanced.thresholds[safety] == pytest.approx(table["presets"]["balanced"][safety]) == pytest.approx(info.thresholds[safety])
    assert not list((tmp_path / "adapter").glob("*.gguf"))  # the staged, uncalibrated file is gone
    assert [p.name for p in (rtlocal_home / "models").iterdir()] == ["tiny-cal.gguf"]
    # the registered model is the trained one with a new table, not only a table: the same scores as a
    # model converted again from the adapter (the calibration once truncated the file it was copying)
    from convert.convert import convert
    from rtlocal.runtime.prompts import Message

    again = convert(str(tiny_base), tmp_path / "again.gguf", adapter=tmp_path / "adapter", out_type="f16", name="tiny-cal")
    prompts = [[Message("user", row["prompt"])] for row in rows[::6]]
    with Engine(r.path, n_ctx=256) as a, Engine(again.path, n_ctx=256) as b:
        for msgs in prompts:
            pa, pb = a.decide(msgs, build_policy(a.refusal.categories)), b.decide(msgs, build_policy(b.refusal.categories))
            assert all(abs(pa.probs[c] - pb.probs[c]) < 1e-3 for c in pb.probs)
            assert abs(pa.p_respond - pb.p_respond) < 1e-3


def test_only_the_default_recipe_calibrates_its_build():
    """`make chat`'s model gets `balanced` from its held-out split; the comparison recipes stay as measured."""
    from finetune.recipes import RECIPES, get_recipe

    assert {n for n in RECIPES if get_recipe(n, base="unused").calibrate} == {"default"}


def test_training_ids_follow_the_runtime(tiny_base, tiny_adapter):
    """Prompt ids equal apply_chat_template's; the answer opens with the token id and ends with `<|im_end|>\\n`."""
    from transformers import AutoTokenizer

    from finetune.data import Record
    from finetune.encoding import IGNORE, ChatEncoder

    tok = AutoTokenizer.from_pretrained(tiny_adapter)
    enc = ChatEncoder(tok)
    msgs = [{"role": "user", "content": "Tell me a story about a robot."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert enc.prompt_ids(msgs) == list(ids)
    assert enc.end_ids == tok("<|im_end|>\n", add_special_tokens=False).input_ids
    start = tok.convert_tokens_to_ids("[Humanizing requests]")
    ex = enc.encode(Record(msgs, "No.", "Humanizing requests"), start, respond_id=tok.convert_tokens_to_ids(RESPOND_TOKEN), max_length=128, max_answer_tokens=32)
    assert ex.input_ids[: len(ids)] == list(ids) and ex.input_ids[len(ids)] == start
    assert ex.labels[: len(ids)] == [IGNORE] * len(ids) and ex.first == len(ids)
    assert ex.input_ids[-len(enc.end_ids) :] == enc.end_ids
    # user text that spells a control token stays plain text, as at run time
    sneaky = enc.prompt_ids([{"role": "user", "content": "[respond] <|im_end|>"}])
    assert start not in sneaky and tok.convert_tokens_to_ids(RESPOND_TOKEN) not in sneaky


def test_refusal_texts_can_be_trained_whole(tiny_base, tiny_adapter):
    """max_refusal_tokens: refusals keep their whole text and end of turn while answers are cut."""
    from transformers import AutoTokenizer

    from finetune.config import TrainConfig
    from finetune.data import Record
    from finetune.encoding import ChatEncoder, encode_dataset

    tok = AutoTokenizer.from_pretrained(tiny_adapter)
    enc = ChatEncoder(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tokens_for_mode("categorical")}
    msgs = [{"role": "user", "content": "Tell me about your childhood."}]
    long_text = "I am a program without a childhood of my own, but I can tell you how children grow up in many places."
    recs = [Record(msgs, long_text, "Humanizing requests"), Record(msgs, long_text, None)]
    n_text = len(tok(long_text, add_special_tokens=False).input_ids)
    assert n_text > 8
    cut, _ = encode_dataset(enc, recs, ids, TrainConfig(max_answer_tokens=4, max_length=256))
    whole, _ = encode_dataset(enc, recs, ids, TrainConfig(max_answer_tokens=4, max_refusal_tokens=64, max_length=256))
    for ex in cut:  # both cut to 4 tokens after the start token, no end of turn
        assert len(ex.input_ids) - ex.first - 1 == 4
    refusal, answer = whole
    assert refusal.input_ids[-len(enc.end_ids):] == enc.end_ids
    assert len(refusal.input_ids) - refusal.first - 1 == n_text + len(enc.end_ids)
    assert len(answer.input_ids) - answer.first - 1 == 4


def test_fast_forward_equals_peft_forward(tiny_base, tiny_data, tmp_path):
    import torch

    from finetune.encoding import collate
    from finetune.model import Forward
    from finetune.trainer import prepare

    prep = prepare(tiny_config(tiny_base, tiny_data, tmp_path / "o"))
    fwd = Forward(prep.model, 3.0)
    assert fwd.fast
    batch = collate(prep.train, 0)
    fast, _ = fwd.loss(batch)
    fwd.fast = False
    slow, _ = fwd.loss(batch)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_shared_prefix_gives_the_loss_and_gradients_of_whole_rows(tiny_base, tmp_path):
    """The batch's common opening runs once with its keys and values shared: the same function as every row whole."""
    import torch

    from finetune.encoding import collate
    from finetune.model import Forward, _trainable, shared_prefix
    from finetune.trainer import prepare

    rows = [{"messages": [{"role": "system", "content": "You are a helpful assistant who answers briefly."}, {"role": "user", "content": r["prompt"]}],
             **{k: v for k, v in r.items() if k != "prompt"}} for r in TRAIN_ROWS]
    data = tmp_path / "system.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = prepare(tiny_config(tiny_base, data, tmp_path / "o"))
    fwd = Forward(prep.model, 3.0)
    batch = collate(prep.train, 0)
    p = shared_prefix(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert p >= 8  # the system turn and the user turn's header

    def loss_and_grad(share: bool) -> tuple[float, torch.Tensor]:
        fwd.share_prefix = share
        prep.model.zero_grad(set_to_none=True)
        loss, _ = fwd.loss(batch)
        loss.backward()
        return loss.item(), torch.cat([q.grad.flatten() for _, q in _trainable(prep.model) if q.grad is not None])

    shared, whole = loss_and_grad(True), loss_and_grad(False)
    assert shared[0] == pytest.approx(whole[0], rel=1e-5)
    assert torch.allclose(shared[1], whole[1], rtol=1e-4, atol=1e-6)


def test_shared_prefix_stops_before_the_first_label():
    """Never past a row's first labelled position, its padding or a lone row."""
    import torch

    from finetune.encoding import IGNORE
    from finetune.model import shared_prefix

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0], [1, 2, 3, 4, 5, 6, 8, 9]])
    mask = (ids != 0).long()
    labels = torch.full_like(ids, IGNORE)
    labels[:, 6:] = ids[:, 6:]
    assert shared_prefix(ids, mask, labels) == 5  # 6 in common; position 5 predicts the first label
    labels[1, 3:] = ids[1, 3:]
    assert shared_prefix(ids, mask, labels) == 2
    labels[1, 2:] = ids[1, 2:]
    assert shared_prefix(ids, mask, labels) == 0  # too short to be worth a second pass
    assert shared_prefix(ids[:1], mask[:1], labels[:1]) == 0
    short = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 8, 9]])
    assert shared_prefix(short, (short != 0).long(), torch.full_like(short, IGNORE)) == 2  # the short row's length


def test_bf16_autocast_parity(tiny_base, tiny_data, tmp_path):
    """bf16 autocast keeps the loss and its gradients close to fp32 (bounds, not equality: CPUs differ)."""
    import torch

    from finetune.encoding import collate
    from finetune.model import Forward, _trainable, autocast
    from finetune.trainer import prepare

    prep = prepare(tiny_config(tiny_base, tiny_data, tmp_path / "o", precision="bf16"))
    fwd = Forward(prep.model, 3.0)
    batch = collate(prep.train, 0)

    def loss_and_grad(precision: str) -> tuple[float, torch.Tensor]:
        prep.model.zero_grad(set_to_none=True)
        with autocast(prep.device, precision):
            loss, _ = fwd.loss(batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for _, p in _trainable(prep.model) if p.grad is not None])
        return loss.item(), grads

    l32, g32 = loss_and_grad("fp32")
    l16, g16 = loss_and_grad("bf16")
    assert abs(l16 - l32) / l32 < 0.02
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.98


def test_cpu_flags_decide_native_bf16():
    from finetune.model import bf16_native, cpu_flags

    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
    assert {"avx2", "avx512_bf16"} <= cpu_flags(text) and cpu_flags("processor : 0\n") == set()
    assert bf16_native("cpu", flags={"avx512f", "avx512_bf16"}) and bf16_native("cpu", flags={"amx_bf16"})
    assert not bf16_native("cpu", flags={"avx2", "avx512f"})  # emulated there: slower than fp32
    assert not bf16_native("mps", flags={"avx512_bf16"})


def test_auto_precision_checks_parity_on_the_first_batch(tiny_base, tiny_data, tmp_path):
    """auto: bf16 only on native hardware and when the first batch's loss matches fp32; fixed choices pass through."""
    import pytest

    from finetune.encoding import collate
    from finetune.model import BF16_PARITY_TOLERANCE, Forward, bf16_native, bf16_parity
    from finetune.trainer import choose_precision, prepare

    prep = prepare(tiny_config(tiny_base, tiny_data, tmp_path / "o"))
    fwd = Forward(prep.model, 3.0)
    batch = collate(prep.train[:4], 0)
    parity = bf16_parity(fwd, batch, "cpu")
    assert 0.0 <= parity < BF16_PARITY_TOLERANCE  # a real difference, far inside the bound
    chosen, measured = choose_precision("auto", fwd, batch, "cpu")
    if bf16_native("cpu"):
        assert chosen == "bf16" and measured == pytest.approx(parity, abs=1e-3)
    else:
        assert (chosen, measured) == ("fp32", None)
    assert choose_precision("fp32", fwd, batch, "cpu") == ("fp32", None)
    assert choose_precision("bf16", fwd, batch, "cpu") == ("bf16", None)
    with pytest.raises(ValueError, match="auto is resolved first"):
        from finetune.model import autocast

        autocast("cpu", "auto")


def test_interrupt_saves_and_resume_finishes(tiny_base, tiny_data, tmp_path):
    from finetune.progress import LogProgress
    from finetune.trainer import train

    class StopAt(LogProgress):
        def update(self, done, **info):
            if done == 5:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    cfg = tiny_config(tiny_base, tiny_data, out, max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=StopAt())
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and not (out / "rtlocal.json").exists()
    class Record(LogProgress):
        def start(self, description, total, initial=0):
            super().start(description, total, initial)
            self.started = (description, total, initial)

    rec = Record()
    r = train(replace(cfg, resume=True), progress=rec)
    assert r.steps == 8 and (out / "rtlocal.json").exists() and not (out / "checkpoint").exists()
    assert rec.started == ("training", 8, 5)  # the bar's ETA counts only this run's steps
    from finetune.trainer import RtlocalError

    with pytest.raises(RtlocalError, match="--resume: no checkpoint"):
        train(replace(cfg, resume=True))


def test_eta_after_resume():
    from finetune.progress import eta_seconds

    # 5 of 8 steps were done before the resume; this run did 1 step in 10 s: 2 steps left, 20 s
    assert eta_seconds(10.0, 6, 5, 8) == pytest.approx(20.0)
    assert eta_seconds(10.0, 6, 0, 8) == pytest.approx(10.0 / 6 * 2)
    assert eta_seconds(0.0, 5, 5, 8) == 0.0 and eta_seconds(3.0, 2, 0, None) == 0.0


def test_single_mode_tokens(tiny_base, tiny_data, tmp_path):
    from finetune.trainer import prepare

    prep = prepare(tiny_config(tiny_base, tiny_data, tmp_path / "o", mode="single", token_init="mean"))
    assert list(prep.token_ids) == tokens_for_mode("single")
    assert {e.target for e in prep.train} == {"refuse", "respond"}


# ------------------------------------------------------------------ bad input through the CLI


def run_cli(capsys, *args: str) -> tuple[int, str]:
    from rtlocal.cli import main

    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_cli_bad_inputs(tiny_base, tiny_data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, line = run_cli(capsys, "finetune", str(tiny_base), "--data", str(empty), "--out", str(tmp_path / "o"))
    assert rc == 1 and line.startswith("Error: ") and "empty dataset" in line

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "category": "Rude requests", "response": "no"}) + "\n")
    rc, line = run_cli(capsys, "finetune", str(tiny_base), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 1 and line == f"Error: {bad}:1: unknown category 'Rude requests' for categorical mode (known: Humanizing requests, Incomplete requests, Indeterminate requests, Requests with safety concerns, Unsupported requests)"

    rc, line = run_cli(capsys, "finetune", str(tmp_path / "no-such-base.gguf"), "--data", str(tiny_data), "--out", str(tmp_path / "o"))
    assert rc == 1 and line == f"Error: {tmp_path / 'no-such-base.gguf'}: no such file or directory"

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, line = run_cli(capsys, "finetune", str(tiny_base), "--data", str(tiny_data), "--out", str(blocker / "out"))
    assert rc == 1 and line.startswith(f"Error: cannot write to {blocker / 'out'}")

    rc, line = run_cli(capsys, "finetune", str(tiny_base), "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--epochs", "0")
    assert rc == 2 and line == "Error: epochs must be > 0, got 0.0"

    rc, line = run_cli(capsys, "build", "--precision", "half", "--name", "never-built")
    assert rc == 2 and line == "Error: precision must be one of auto, fp32, bf16, got 'half'"

    rc, line = run_cli(capsys, "build", "--recipe", "nope")
    assert rc == 2 and line == "Error: unknown recipe 'nope' (known: default, builtin-only, benchmark)"


def test_cli_finetune_runs(tiny_base, tiny_data, tmp_path, capsys):
    from rtlocal.cli import main

    out = tmp_path / "cli-out"
    rc = main(["finetune", str(tiny_base), "--data", str(tiny_data), "--out", str(out), "--max-steps", "3", "--lora-r", "2", "--val-fraction", "0", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_distill_answers_with_the_base_model(tiny_plain_gguf, tmp_path, capsys):
    from finetune.data import load_source
    from rtlocal.cli import main

    src = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Tell me a story about a robot."}, {"prompt": "Do you dream?", "category": "humanizing"}, {"prompt": "Hi", "response": "Hello!"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answered.jsonl"
    rc = main(["data", "distill", str(src), "--out", str(out), "--model", str(tiny_plain_gguf), "--max-tokens", "4", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert "1 answered, 2 unchanged" in capsys.readouterr().out
    a, b, c = load_source(str(out))
    assert a.answer and a.category is None  # written by the model
    assert b.answer is None and b.category == "Humanizing requests"  # refusals get a template when training
    assert c.answer == "Hello!"
