"""The prompt-tuning trainer: frozen base, learning, PEFT parity, exact resume, cancellation, early stopping."""

from __future__ import annotations

import dataclasses
import random
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers.optimization import Adafactor

from server.serving.model import Decoding, FrozenT5, Row
from server.serving.tiny import build_tiny_t5
from server.training import (
    ADAFACTOR_SETTINGS,
    PromptTrainer,
    TrainingCancelled,
    TrainingCheckpoint,
    TrainingConfig,
)
from server.training.recipe import VOCAB_INIT_TOP_IDS

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tiny model's ops are too small to gain from threads; on a shared 2-core box they lose ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))

    return [" ".join(word() for _ in range(rng.randint(1, 3))) for _ in range(count)]


def mixed_targets(count: int) -> list[tuple[str, str]]:
    labels = ["yes", "no", "maybe so"]
    return [(f"input number {i} {'x' * (i % 7)}", labels[i % 3]) for i in range(count)]


def rank_accuracy(model: FrozenT5, prompt: torch.Tensor, data: list[tuple[str, str]], labels: list[str]) -> float:
    """Accuracy of `/v1/classify`'s decision (FrozenT5.score), independent of the trainer's own evaluation."""
    on_device = model.prompt_on_device(prompt)
    rows = [Row(prompt=on_device, input_ids=ids) for ids in model.tokenize([text for text, _ in data])]
    scores = model.score(rows, [model.tokenize(labels)] * len(rows))
    predicted = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
    return sum(p == target for p, (_, target) in zip(predicted, data, strict=True)) / len(data)


# ------------------------------------------------------------------------------------------ 1. frozen base


def test_only_the_prompt_gets_gradients(tiny: FrozenT5) -> None:
    before = {name: tensor.clone() for name, tensor in tiny.model.state_dict().items()}
    trainer = PromptTrainer(tiny, mixed_targets(64), mixed_targets(12), TrainingConfig(prompt_length=6, steps=5))
    assert trainer.prompt.requires_grad and trainer.prompt.dtype == torch.float32
    initial = trainer.prompt.detach().clone()

    grads: list[torch.Tensor] = []
    original_step = trainer.optimizer.step

    def spy_step(*args: object, **kwargs: object) -> object:
        assert trainer.prompt.grad is not None
        grads.append(trainer.prompt.grad.clone())
        return original_step(*args, **kwargs)

    trainer.optimizer.step = spy_step  # type: ignore[method-assign]
    result = trainer.train()

    assert len(grads) == 5 and all(bool(g.abs().sum() > 0) for g in grads)
    assert not torch.equal(trainer.prompt.detach(), initial)
    assert result.prompt.embeddings.shape == (6, tiny.d_model)
    assert not tiny.model.training
    for name, param in tiny.model.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed during training"


def test_training_layout_is_the_serving_layout(tiny: FrozenT5) -> None:
    """Rows of different input lengths: same embeddings and mask as `FrozenT5.layout`, and it is differentiable."""
    trainer = PromptTrainer(tiny, mixed_targets(30), config=TrainingConfig(prompt_length=5, batch_size=7))
    batch = trainer.batch(0)
    embeds, mask = trainer.layout(trainer.prompt, batch)
    rows = [
        Row(prompt=trainer.prompt.detach(), input_ids=ids[m.bool()].tolist())
        for ids, m in zip(batch.input_ids, batch.input_mask, strict=True)
    ]
    assert len({len(r.input_ids) for r in rows}) > 1
    want_embeds, want_mask = tiny.layout(rows)
    assert torch.equal(mask, want_mask)
    # Padding rows are embed(pad) here (as in PEFT) and zeros in serving: masked out, so they never matter.
    assert torch.equal(embeds.detach()[mask.bool()], want_embeds[mask.bool()])
    with torch.no_grad():
        first_token = trainer.make_batch(batch.input_ids, batch.input_mask, batch.labels[:, :1])
        states = trainer.decoder_states(trainer.prompt, first_token)
        logits = tiny.model.lm_head(states[:, 0])
    torch.testing.assert_close(logits, tiny.first_step_logits(rows), rtol=0, atol=1e-4)
    embeds.sum().backward()
    assert trainer.prompt.grad is not None
    assert torch.equal(trainer.prompt.grad, torch.full_like(trainer.prompt, 7.0))


# ------------------------------------------------------------------------------------------ 2. it learns


def teacher_task(model: FrozenT5, count: int, labels: list[str]) -> list[tuple[str, str]]:
    """Inputs labelled by the frozen model's own rank-classification decision under a hidden teacher prompt.

    The decision is the score margin between the two labels, thresholded at its median so the classes are
    balanced; the middle half of the margins is dropped so every kept label is a clear teacher decision.
    """
    texts = random_texts(count, seed=1)
    teacher = torch.randn(8, model.d_model, generator=torch.Generator().manual_seed(123))
    rows = [Row(prompt=teacher, input_ids=ids) for ids in model.tokenize(texts)]
    scores = model.score(rows, [model.tokenize(labels)] * len(rows))
    margins = torch.tensor([yes - no for yes, no in scores])
    low, median, high = torch.quantile(margins, torch.tensor([0.25, 0.5, 0.75])).tolist()
    return [
        (text, labels[0] if margin > median else labels[1])
        for text, margin in zip(texts, margins.tolist(), strict=True)
        if not low < margin < high
    ]


def test_learns_a_hidden_teacher_prompt_task(tiny: FrozenT5) -> None:
    labels = ["yes", "no"]
    data = teacher_task(tiny, 1200, labels)
    train, eval_set, test = data[:360], data[360:480], data[480:]
    assert abs(sum(t == "yes" for _, t in data) / len(data) - 0.5) < 0.05
    config = TrainingConfig(prompt_length=8, init="vocab", learning_rate=0.1, steps=120, batch_size=32, eval_every=20)
    trainer = PromptTrainer(tiny, train, eval_set, config)
    assert trainer.eval_metric == "rank_accuracy"

    untrained = rank_accuracy(tiny, trainer.prompt.detach(), test, labels)
    result = trainer.train()
    trained = rank_accuracy(tiny, result.prompt.embeddings, test, labels)

    assert 0.35 <= untrained <= 0.65, untrained
    assert trained > 0.70, (untrained, trained, result.history)
    assert result.best_eval is not None and result.best_eval["accuracy"] > 0.70
    assert [entry["step"] for entry in result.history] == list(range(20, 121, 20))
    assert sum(result.losses[-20:]) / 20 < sum(result.losses[:20]) / 20


# ------------------------------------------------------------------------------------------ 3. constant target


def test_constant_target_is_generated_exactly(tiny: FrozenT5) -> None:
    texts = random_texts(160, seed=2)
    train, held_out = [(t, "ok") for t in texts[:128]], texts[128:]
    config = TrainingConfig(prompt_length=8, init="random", learning_rate=0.3, steps=60, batch_size=16, eval_every=20)
    trainer = PromptTrainer(tiny, train, [(t, "ok") for t in held_out[:16]], config)
    assert trainer.eval_metric == "exact_match"  # one label: no rank classification
    before = tiny.generate(
        [Row(tiny.prompt_on_device(trainer.prompt.detach()), ids) for ids in tiny.tokenize(held_out)],
        Decoding(),
        [8] * 32,
    )
    assert any(g.text != "ok" for g in before)

    result = trainer.train()
    prompt = tiny.prompt_on_device(result.prompt.embeddings)
    outputs = tiny.generate([Row(prompt, ids) for ids in tiny.tokenize(held_out)], Decoding(), [8] * len(held_out))
    assert [g.text for g in outputs] == ["ok"] * len(held_out)
    assert all(g.finish_reason == "eos" for g in outputs)
    assert result.best_eval is not None and result.best_eval["exact_match"] == 1.0


# ------------------------------------------------------------------------------------------ 4. PEFT parity


def test_losses_match_peft_prompt_tuning(tiny: FrozenT5) -> None:
    """Same model weights, init, batches and Adafactor settings: PEFT's per-step losses, within 1e-4.

    PEFT gives a seq2seq model a `[2n, d]` prompt table (`num_transformer_submodules=2`) whose rows `[n:]`
    prompt tuning never uses. Their zero gradients leave Adafactor's factored second moment unchanged but
    halve the RMS its update clipping measures, so that layout trains a (slightly) different prompt;
    `num_transformer_submodules=1` is the plain `[n, d]` prompt of the paper and of softserve.
    """
    from peft import PromptTuningConfig, TaskType, get_peft_model

    config = TrainingConfig(prompt_length=10, init="vocab", steps=20, batch_size=8)
    trainer = PromptTrainer(tiny, mixed_targets(100), config=config)
    initial = trainer.prompt.detach().clone()
    ours = trainer.train().losses

    base, _ = build_tiny_t5()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            base,
            PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=10, num_transformer_submodules=1),
        ).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight
    assert table.shape == initial.shape
    with torch.no_grad():
        table.copy_(initial)
    optimizer = Adafactor([table], lr=config.learning_rate, weight_decay=config.weight_decay, **ADAFACTOR_SETTINGS)
    theirs = []
    for step in range(config.steps):
        batch = trainer.batch(step)
        optimizer.zero_grad()
        loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.input_mask, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        theirs.append(loss.item())

    assert len(ours) == len(theirs) == 20
    assert ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=1e-4)
    torch.testing.assert_close(trainer.prompt.detach(), table.detach(), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ 5. resume


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(tiny: FrozenT5, tmp_path: Path) -> None:
    config = TrainingConfig(prompt_length=6, init="class_labels", steps=12, batch_size=16, eval_every=3)
    train, eval_set = mixed_targets(50), mixed_targets(9)  # 50 % 16 != 0: resume lands mid-epoch
    checkpoints: dict[int, TrainingCheckpoint] = {}

    def keep(checkpoint: TrainingCheckpoint) -> None:
        checkpoints[checkpoint.step] = checkpoint
        checkpoint.save(tmp_path / "job.ckpt")

    full = PromptTrainer(tiny, train, eval_set, config).train(checkpoint_every=4, on_checkpoint=keep)
    assert sorted(checkpoints) == [4, 8]

    # A crashed worker: a fresh trainer continues from what was saved on disk at step 8 ...
    saved = TrainingCheckpoint.load(tmp_path / "job.ckpt")
    assert saved.step == 8
    resumed = PromptTrainer(tiny, train, eval_set, config).train(resume_from=saved)
    # ... and from the in-memory step-4 checkpoint, through bytes.
    again = PromptTrainer(tiny, train, eval_set, config).train(
        resume_from=TrainingCheckpoint.from_bytes(checkpoints[4].to_bytes())
    )
    for other in (resumed, again):
        assert other.losses == full.losses
        assert other.history == full.history
        assert other.best_step == full.best_step
        assert torch.equal(other.prompt.embeddings, full.prompt.embeddings)

    with pytest.raises(ValueError, match="train set"):
        PromptTrainer(tiny, train[:-1], eval_set, config).train(resume_from=saved)
    with pytest.raises(ValueError, match="config"):
        PromptTrainer(tiny, train, eval_set, config.model_copy(update={"seed": 1})).train(resume_from=saved)

    # A checkpoint written before `init_task` and `ensemble_size` existed resumes with their defaults.
    fresh = TrainingCheckpoint.load(tmp_path / "job.ckpt")  # the runs above advanced `saved`'s optimizer state
    older = dataclasses.replace(
        fresh, config={k: v for k, v in fresh.config.items() if k not in ("init_task", "ensemble_size")}
    )
    older_run = PromptTrainer(tiny, train, eval_set, config).train(resume_from=older)
    assert older_run.losses == full.losses


# ------------------------------------------------------------------------------------------ job controls


def test_cancel_stops_before_the_next_step(tiny: FrozenT5) -> None:
    stop = threading.Event()
    seen: list[int] = []

    def progress(step: int, loss: float, metrics: dict[str, float] | None) -> None:
        seen.append(step)
        if step == 3:
            stop.set()

    trainer = PromptTrainer(tiny, mixed_targets(30), config=TrainingConfig(prompt_length=4, steps=50, batch_size=4))
    with pytest.raises(TrainingCancelled) as info:
        trainer.train(on_progress=progress, should_stop=stop)
    assert info.value.step == 3 and seen == [1, 2, 3] and trainer.step == 3

    calls = iter([False, True])
    other = PromptTrainer(tiny, mixed_targets(30), config=TrainingConfig(prompt_length=4, steps=50, batch_size=4))
    with pytest.raises(TrainingCancelled):
        other.train(should_stop=lambda: next(calls))
    assert other.step == 1


def test_early_stopping_returns_the_best_prompt(tiny: FrozenT5, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted evaluations: the best is the 2nd (accuracy), a tie on accuracy is broken by the lower loss."""
    config = TrainingConfig(prompt_length=4, steps=100, batch_size=4, eval_every=2, patience=2)
    trainer = PromptTrainer(tiny, mixed_targets(30), mixed_targets(6), config)
    scripted = iter(
        [
            {"accuracy": 0.5, "loss": 1.0},
            {"accuracy": 0.8, "loss": 0.9},
            {"accuracy": 0.8, "loss": 0.7},  # tie on accuracy, lower loss: the new best (step 6)
            {"accuracy": 0.7, "loss": 0.1},
            {"accuracy": 0.8, "loss": 0.8},
        ]
    )
    monkeypatch.setattr(trainer, "evaluate", lambda prompt=None: next(scripted))
    prompts: dict[int, torch.Tensor] = {}
    events: list[tuple[int, dict[str, float] | None]] = []

    def progress(step: int, loss: float, metrics: dict[str, float] | None) -> None:
        prompts[step] = trainer.prompt.detach().clone()
        events.append((step, metrics))

    result = trainer.train(on_progress=progress)
    assert result.stopped_early and result.steps_run == 10
    assert result.best_step == 6 and result.best_eval == {"accuracy": 0.8, "loss": 0.7}
    assert torch.equal(result.prompt.embeddings, prompts[6])
    assert [e["step"] for e in result.history] == [2, 4, 6, 8, 10]
    assert result.history[0]["loss"] == pytest.approx(sum(result.losses[:2]) / 2)
    assert [m is not None for _, m in events] == [False, True] * 5


def test_batches_walk_seeded_epoch_permutations(tiny: FrozenT5) -> None:
    data = [(f"example {i}", "yes") for i in range(50)]
    trainer = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=2, batch_size=16))
    order = [i for step in range(25) for i in trainer.batch_indices(step)]  # 400 = 8 epochs of 50
    epochs = [order[e * 50 : (e + 1) * 50] for e in range(8)]
    assert all(sorted(epoch) == list(range(50)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 8
    for step in (0, 3, 7):  # step 3 straddles the first epoch boundary
        batch = trainer.batch(step)
        want = trainer.collate([trainer._train_inputs[i] for i in trainer.batch_indices(step)], [[1]] * 16)
        assert torch.equal(batch.input_ids, want.input_ids)
    again = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=2, batch_size=16))
    reseeded = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=2, batch_size=16, seed=5))
    assert [again.batch_indices(s) for s in range(25)] == [trainer.batch_indices(s) for s in range(25)]
    assert reseeded.batch_indices(0) != trainer.batch_indices(0)


# ------------------------------------------------------------------------------------------ init and config


def test_inits(tiny: FrozenT5) -> None:
    weight = tiny.model.get_input_embeddings().weight.detach()
    data = [("a", "yes"), ("b", "no"), ("c", "yes")]
    top = min(VOCAB_INIT_TOP_IDS, tiny.decodable_vocab)

    def is_vocab_row(row: torch.Tensor) -> bool:
        return bool((weight[:top] == row).all(dim=1).any())

    labels = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=5)).initial_prompt()
    for slot, label in enumerate(["yes", "no"]):
        ids = tiny.tokenize([label])[0][:-1]  # without </s>
        torch.testing.assert_close(labels[slot], weight[ids].mean(dim=0))
    assert all(is_vocab_row(row) for row in labels[2:])

    free_text = [(f"q{i}", f"answer {i}") for i in range(40)]  # no label set: every slot sampled
    sampled = PromptTrainer(tiny, free_text, config=TrainingConfig(prompt_length=5)).initial_prompt()
    assert all(is_vocab_row(row) for row in sampled)

    vocab = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=20, init="vocab")).initial_prompt()
    assert all(is_vocab_row(row) for row in vocab) and len({tuple(r.tolist()) for r in vocab}) == 20

    uniform = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=50, init="random")).initial_prompt()
    assert uniform.abs().max() <= 0.5 and uniform.std() > 0.2

    text = PromptTrainer(
        tiny, data, config=TrainingConfig(prompt_length=5, init="text", init_text="ab")
    ).initial_prompt()
    a, b = tiny.tokenize(["ab"])[0][:2]
    assert torch.equal(text, weight[[a, b, a, b, a]])

    same = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=20, init="vocab")).initial_prompt()
    other = PromptTrainer(tiny, data, config=TrainingConfig(prompt_length=20, init="vocab", seed=1)).initial_prompt()
    assert torch.equal(vocab, same) and not torch.equal(vocab, other)


def test_config_validation_and_truncation(tiny: FrozenT5) -> None:
    assert TrainingConfig().model_dump() | {} == {
        "prompt_length": 100,
        "init": "class_labels",
        "init_text": None,
        "init_task": None,
        "learning_rate": 0.3,
        "steps": 2000,
        "batch_size": 32,
        "eval_every": 200,
        "max_input_tokens": 512,
        "max_target_tokens": 16,
        "seed": 0,
        "ensemble_size": 1,
        "weight_decay": 1e-5,
        "patience": None,
        "eval_metric": "auto",
    }
    with pytest.raises(ValidationError):
        TrainingConfig(init="text")
    with pytest.raises(ValidationError):
        TrainingConfig(learning_rate=0.3, lr=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="empty"):
        PromptTrainer(tiny, [], config=TrainingConfig())

    config = TrainingConfig(prompt_length=3, max_input_tokens=5, max_target_tokens=3, batch_size=2)
    trainer = PromptTrainer(tiny, [("abcdefghij", "klmnop"), ("xy", "z")], config=config)
    batch = trainer.collate(trainer._train_inputs, trainer._train_targets)
    eos = tiny.eos_token_id
    assert batch.input_ids[0].tolist() == [*tiny.tokenize(["abcd"])[0][:4], eos]
    assert batch.labels[0].tolist() == [*tiny.tokenize(["kl"])[0][:2], eos]
    assert batch.labels[1].tolist() == [*tiny.tokenize(["z"])[0], -100]
    assert batch.input_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
