"""Tests of llama_lab.finetune: loss masks, LoRA, DPO, the accelerate command line, the exercises."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from llama_lab import chat, checks, finetune, sizing, solutions
from llama_lab.models import load_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Extract the person as JSON.\nMia is 30 and lives in Oslo."},
        {"role": "assistant", "content": '{"name": "Mia", "age": 30, "city": "Oslo"}'},
        {"role": "user", "content": "Now say hi in French."},
        {"role": "assistant", "content": "Bonjour !"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


# --- loss masks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-random", "smollm2-135m"])
def test_loss_mask_covers_exactly_the_assistant_tokens(name, smollm2):
    tokenizer = smollm2[1] if name == "smollm2-135m" else load_model(name)[1]
    ex = finetune.build_example(tokenizer, CHAT)
    assert len(ex["input_ids"]) == len(ex["labels"])
    kept = [i for i, y in enumerate(ex["labels"]) if y != finetune.IGNORE_INDEX]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in kept)
    # the labelled tokens are two runs, one per reply, each the reply followed by the end-of-turn token
    runs, run = [], [kept[0]]
    for i in kept[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    decoded = [tokenizer.decode([ex["input_ids"][i] for i in r]) for r in runs]
    assert decoded == [m["content"] + tokenizer.eos_token for m in CHAT if m["role"] == "assistant"]
    # nothing of the system prompt, the user turns or the "assistant\n" headers is labelled
    masked = tokenizer.decode([t for t, y in zip(ex["input_ids"], ex["labels"], strict=True)
                               if y == finetune.IGNORE_INDEX])
    assert "Mia is 30" in masked and "Bonjour" not in masked


def test_loss_mask_matches_transformers_assistant_mask(smollm2):
    """transformers computes the same mask from a template with {% generation %} tags."""
    tokenizer = smollm2[1]
    ex = finetune.build_example(tokenizer, CHAT)
    tagged = chat.SMOLLM2_TEMPLATE_WITH_GENERATION_TAGS
    assert tokenizer.apply_chat_template(CHAT, chat_template=tagged, tokenize=False) == \
        tokenizer.apply_chat_template(CHAT, tokenize=False)  # the same text as SmolLM2's own template
    ref = tokenizer.apply_chat_template(CHAT, chat_template=tagged, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ex["input_ids"]
    assert ref["assistant_masks"] == [int(y != finetune.IGNORE_INDEX) for y in ex["labels"]]


def test_collate_pads_right_and_masks_padding():
    tokenizer = load_model("tiny-random")[1]
    examples = [finetune.build_example(tokenizer, CHAT[:2]), finetune.build_example(tokenizer, CHAT)]
    batch = finetune.collate(examples, tokenizer.pad_token_id)
    n = len(examples[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(examples[1]["input_ids"]))
    assert batch["attention_mask"][0].sum() == n and batch["attention_mask"][1].all()
    assert (batch["labels"][0, n:] == finetune.IGNORE_INDEX).all()


def test_data_files_split_train_and_heldout():
    train, held = finetune.load_jsonl("ft_people_train"), finetune.load_jsonl("ft_people_heldout")
    assert len(train) >= 100 and len(held) >= 20
    answers = [[json.loads(r["messages"][-1]["content"]) for r in rows] for rows in (train, held)]
    for key in ("name", "city"):  # held-out people and places never appear in training
        assert not {a[key] for a in answers[0]} & {a[key] for a in answers[1]}
    for row, answer in zip(held, answers[1], strict=True):
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert all(str(v) in row["messages"][1]["content"] for v in answer.values())
    pairs = finetune.load_jsonl("ft_prefs_train") + finetune.load_jsonl("ft_prefs_heldout")
    assert len(pairs) >= 24 and len({p["prompt"] for p in pairs}) == len(pairs)


# --- LoRA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,alpha,targets", [(8, 16, ("q_proj", "v_proj")),
                                             (4, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))])
def test_lora_trainable_parameters_match_peft(r, alpha, targets):
    ours = finetune.add_lora(tiny_model(), r=r, alpha=alpha, targets=targets)
    theirs = get_peft_model(tiny_model(), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    assert finetune.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]
    assert sum(isinstance(m, finetune.LoRALinear) for m in ours.modules()) == 4 * len(targets)


def test_lora_starts_as_an_exact_no_op_and_freezes_the_base():
    ids = torch.randint(0, 259, (2, 12))
    model = tiny_model()
    before = model(ids).logits
    finetune.add_lora(model, r=8, alpha=16)
    assert torch.equal(model(ids).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scale == 2.0 and torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.std() > 0


def test_lora_forward_and_merge_are_exact():
    ids = torch.randint(0, 259, (2, 12))
    model = finetune.add_lora(tiny_model(), r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, finetune.LoRALinear):
                m.lora_B.weight.normal_()
    x = torch.randn(3, 64)
    q = model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(q(x), x @ (q.base.weight + 2.0 * q.lora_B.weight @ q.lora_A.weight).T)
    with torch.no_grad():
        adapted = model(ids).logits
        finetune.merge_lora(model)
        merged = model(ids).logits
    assert not any(isinstance(m, finetune.LoRALinear) for m in model.modules())
    assert not torch.equal(adapted, tiny_model()(ids).logits)  # the update did change the model
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_lora_matches_peft_same_init_same_training():
    """Same seed: peft draws the same A matrices; same batches: the same losses and trained weights."""
    tokenizer = load_model("tiny-random")[1]
    rows = finetune.load_jsonl("ft_people_train")[:16]
    examples = [finetune.build_example(tokenizer, r["messages"]) for r in rows]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    results = []
    for attach in (lambda m: finetune.add_lora(m, r=8, alpha=16), lambda m: get_peft_model(m, config)):
        torch.manual_seed(1)
        model = attach(tiny_model())
        lora = [p for n, p in model.named_parameters() if "lora_" in n]  # the same order in both
        initial = [p.detach().clone() for p in lora]
        loader = finetune.data_loader(examples, 8, lambda b: finetune.collate(b, tokenizer.pad_token_id))
        results.append((initial, finetune.train(model, loader, steps=5, lr=1e-2, progress=False), lora))
    (ours_init, ours_history, ours_lora), (peft_init, peft_history, peft_lora) = results
    assert len(ours_init) == len(peft_init) == 16 and all(map(torch.equal, ours_init, peft_init))
    torch.testing.assert_close(ours_history, peft_history, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(ours_lora, peft_lora, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_remove_lora_gives_back_the_base_layers():
    ids = torch.randint(0, 259, (2, 12))
    model = tiny_model()
    before = model(ids).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    finetune.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, finetune.LoRALinear):
                m.lora_B.weight.normal_()
        assert not torch.equal(model(ids).logits, before)
        finetune.remove_lora(model)
        assert torch.equal(model(ids).logits, before)  # the base weights were never touched
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert finetune.trainable_parameters(model) == 0


def test_finetune_memory_13b():
    config = sizing.llama2_config("13b")
    full = sum(finetune.finetune_memory(config, "full").values())
    assert full == 16 * sizing.count_parameters(config) and full > 200e9
    lora = finetune.finetune_memory(config, "lora")
    assert lora["weights"] == sizing.weight_bytes(config, "bf16")
    assert lora["gradients"] == 2 * 40 * 2 * 8 * (5120 + 5120)  # q and v, r=8, 40 layers, bf16
    qlora = sum(finetune.finetune_memory(config, "qlora").values())
    assert 6e9 < qlora < 8e9 < sum(lora.values()) < 30e9
    sharded = finetune.finetune_memory(config, "full", n_gpus=8)
    assert sum(sharded.values()) == pytest.approx(full / 8)


# --- training -----------------------------------------------------------------------------------

def test_sft_loss_equals_the_models_own_loss_with_fewer_logits():
    tokenizer = load_model("tiny-random")[1]
    model = tiny_model()
    rows = finetune.load_jsonl("ft_people_train")[:4]
    batch = finetune.collate([finetune.build_example(tokenizer, r["messages"]) for r in rows],
                             tokenizer.pad_token_id)
    logits, targets = finetune.labelled_logits(model, batch)
    n_labelled = int((batch["labels"][:, 1:] != finetune.IGNORE_INDEX).sum())
    assert logits.shape == (n_labelled, 259) and targets.shape == (n_labelled,)
    assert n_labelled < batch["input_ids"].numel() / 2  # the prompts and the padding get no logits
    torch.testing.assert_close(finetune.sft_loss(model, batch), model(**batch).loss)


def lora_model_and_loader(n_rows: int, batch_size: int):
    """A tiny model with LoRA adapters and a loader of the first `n_rows` SFT conversations."""
    tokenizer = load_model("tiny-random")[1]
    model = finetune.add_lora(tiny_model(), r=8, alpha=16)
    rows = finetune.load_jsonl("ft_people_train")[:n_rows]
    examples = [finetune.build_example(tokenizer, r["messages"]) for r in rows]
    pad = tokenizer.pad_token_id
    return model, finetune.data_loader(examples, batch_size, lambda b: finetune.collate(b, pad))


def test_train_calls_on_step_after_every_step():
    model, loader = lora_model_and_loader(8, 4)
    seen = []
    lora_b = model.model.layers[0].self_attn.q_proj.lora_B.weight
    finetune.train(model, loader, steps=3, lr=1e-2, progress=False,
                   on_step=lambda step: seen.append((step, lora_b.abs().sum().item())))
    assert [step for step, _ in seen] == [1, 2, 3]
    assert 0 < seen[0][1] < seen[2][1]  # called after the optimizer step: B has already moved


def test_train_lowers_the_loss_of_a_tiny_model():
    model, loader = lora_model_and_loader(16, 16)
    history = finetune.train(model, loader, steps=15, lr=1e-2, progress=False)
    assert len(history) == 15 and history[-1] < history[0] - 0.2  # 5.54 (ln 259, random) -> 5.2


def test_generate_replies_and_json_accuracy_on_the_untrained_model(smollm2):
    model, tokenizer = smollm2
    rows = finetune.load_jsonl("ft_people_heldout")[:4]
    accuracy, replies = finetune.json_accuracy(model, tokenizer, rows)
    assert len(replies) == 4 and all(isinstance(r, str) and r for r in replies)
    expected = [r["messages"][-1]["content"] for r in rows]
    assert accuracy == sum(map(finetune.json_match, replies, expected)) / 4
    assert tokenizer.padding_side == "right"  # restored


# --- DPO ----------------------------------------------------------------------------------------

def test_dpo_loss_matches_a_hand_computed_case():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    # margins: 0.5 * ((-10 + 11) - (-12 + 11)) = 1.0 and 0.5 * ((-4 + 4) - (-3 + 4)) = -0.5
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2
    torch.testing.assert_close(finetune.dpo_margin(pc, pr, rc, rr, beta=0.5), torch.tensor([1.0, -0.5]))
    assert finetune.dpo_loss(pc, pr, rc, rr, beta=0.5).item() == pytest.approx(expected)


def test_sequence_logprobs_sums_the_labelled_tokens():
    tokenizer = load_model("tiny-random")[1]
    model = tiny_model()
    ex = finetune.build_example(tokenizer, CHAT[:2])
    batch = finetune.collate([ex], tokenizer.pad_token_id)
    logp = model(batch["input_ids"]).logits.log_softmax(-1)[0]
    expected = sum(logp[i - 1, t] for i, t in enumerate(ex["labels"]) if t != finetune.IGNORE_INDEX)
    torch.testing.assert_close(finetune.sequence_logprobs(model, batch), expected.reshape(1))


def test_dpo_training_raises_the_margin():
    tokenizer = load_model("tiny-random")[1]
    model = finetune.add_lora(tiny_model(), r=8, alpha=16)
    pairs = finetune.preference_examples(tokenizer, finetune.load_jsonl("ft_prefs_train")[:8])
    finetune.add_reference_logprobs(model, pairs, tokenizer.pad_token_id)
    batch = finetune.collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(finetune.dpo_margins(model, batch), torch.zeros(8))  # policy == reference
    loader = finetune.data_loader(pairs, 8, lambda b: finetune.collate_pairs(b, tokenizer.pad_token_id))
    log = []
    history = finetune.train(model, loader, lambda m, b: finetune.dpo_batch_loss(m, b, log=log), steps=10,
                             lr=1e-2, progress=False)
    assert history[0] == pytest.approx(math.log(2), abs=1e-5) and history[-1] < history[0]
    assert len(log) == 10  # step 1: policy == reference, every reward 0
    assert log[0] == pytest.approx({"chosen": 0.0, "rejected": 0.0, "margin": 0.0}, abs=1e-5)
    assert all(e["margin"] == pytest.approx(e["chosen"] - e["rejected"], abs=1e-6) for e in log)
    assert log[-1]["margin"] > 0
    with torch.no_grad():
        chosen, rejected = finetune.dpo_rewards(model, batch)
        torch.testing.assert_close(chosen - rejected, finetune.dpo_margins(model, batch))
        assert finetune.dpo_margins(model, batch).mean() > 0



def test_dpo_loss_rewards_and_sequence_logprobs_equal_trl(tmp_path):
    """TRL's DPOTrainer tokenizes two pairs and computes its loss and logged rewards; ours, on the
    same tokens (its completion mask as our labels), must give the same numbers."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    tokenizer = load_model("tiny-random")[1]
    reference, model = tiny_model(), tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = [{"prompt": "Give me JSON:", "chosen": ' {"a": 1}', "rejected": " no"},
             {"prompt": "Say hi", "chosen": " hi there", "rejected": " go away now"}]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, beta=0.1, report_to=[],
                     use_cpu=True, disable_tqdm=True)
    datasets.disable_progress_bars()
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(pairs))
    inputs = next(iter(trainer.get_train_dataloader()))  # the chosen rows, then the rejected ones
    model.train()
    trl_loss = trainer.compute_loss(model, inputs)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "labels": inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, finetune.IGNORE_INDEX)}
    policy_chosen, policy_rejected = finetune.sequence_logprobs(model, batch).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = finetune.sequence_logprobs(reference, batch).chunk(2)
    ours = finetune.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    assert abs(ours.item() - math.log(2)) > 0.01  # the policy differs from the reference
    torch.testing.assert_close(ours, trl_loss)
    assert policy_chosen.mean().item() == pytest.approx(logged["logps/chosen"], rel=1e-5)
    assert policy_rejected.mean().item() == pytest.approx(logged["logps/rejected"], rel=1e-5)
    margins = finetune.dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    assert margins.mean().item() == pytest.approx(logged["rewards/margins"], rel=1e-4, abs=1e-6)
    chosen_rewards = 0.1 * (policy_chosen - ref_chosen)
    assert chosen_rewards.mean().item() == pytest.approx(logged["rewards/chosen"], rel=1e-4, abs=1e-6)

# --- command line under accelerate --------------------------------------------------------------

def test_command_line_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    out = tmp_path / "lora.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate_cpu_2proc.yaml"), "-m", "llama_lab.finetune",
           "--model", "tiny-random", "--steps", "4", "--batch-size", "4", "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "loss: first" in result.stdout
    state = torch.load(out)
    assert len(state) == 4 * 2 * 2 and all("lora_" in k for k in state)  # 4 layers x (q, v) x (A, B)


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate_fsdp_13b.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.mixed_precision == "bf16"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True  # needed with frozen base weights
    cpu = load_config_from_file(str(ROOT / "configs" / "accelerate_cpu_2proc.yaml"))
    assert cpu.num_processes == 2 and cpu.distributed_type == "MULTI_GPU"  # the torchrun launcher


# --- exercises ----------------------------------------------------------------------------------

@pytest.mark.parametrize("check, solution, wrong_answers", [
    (checks.check_loss_mask, solutions.loss_mask_labels,
     [(lambda ids, start, end: list(ids), "nothing is masked"),
      (lambda ids, start, end: [-100] * start + list(ids[start:]), "the tokens after end"),
      (lambda ids, start, end: [-100 if start <= i < end else t for i, t in enumerate(ids)],
       "the reply itself is masked")]),
    (checks.check_lora_forward, solutions.lora_forward,
     [(lambda x, W, A, B, alpha, r: x @ W.T + x @ A.T @ B.T, "the wrong size"),  # no alpha / r
      (lambda x, W, A, B, alpha, r: alpha / r * x @ A.T @ B.T, "x @ W.T is missing")]),
    (checks.check_dpo_loss, solutions.dpo_loss,
     [(lambda pc, pr, rc, rr, beta: -torch.nn.functional.logsigmoid(beta * (pc - pr)).mean(),
       "the reference model is missing"),
      (lambda pc, pr, rc, rr, beta: solutions.dpo_loss(pr, pc, rr, rc, beta), "chosen and rejected are"),
      (lambda pc, pr, rc, rr, beta: solutions.dpo_loss(pc, pr, rc, rr, beta) * len(pc), "is the mean"),
      (lambda pc, pr, rc, rr, beta: solutions.dpo_loss(pc, pr, rc, rr, 1.0), "beta is missing")]),
], ids=["loss_mask", "lora_forward", "dpo_loss"])
def test_checkers_pass_the_solutions_and_fail_wrong_answers(check, solution, wrong_answers, verdicts):
    verdicts(check, solution, *wrong_answers)
