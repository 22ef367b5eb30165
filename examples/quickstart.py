"""LoRAPrune end to end on a tiny Llama with grouped-query attention (random weights, no download).

Fine-tunes and prunes to 50% of heads and MLP channels with the Trainer and LoRAPruneCallback, saves the adapter,
reloads it, checks the outputs match, and merges it into a plain transformers model. Runs in well under a minute
on a CPU. For real models and data see the other examples.
"""

import argparse
import tempfile

import datasets
import torch
import transformers
from peft import PeftModel, get_peft_model

import peft_loraprune  # noqa: F401  (registers LoRAPrune with PEFT)
from peft_loraprune import LoRAPruneCallback, LoRAPruneConfig


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--granularity", default="structured")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    # a learnable toy language: each token is followed by (token * 3 + 1) mod vocab
    starts = torch.randint(0, 128, (256, 1), generator=g)
    seqs = [starts]
    for _ in range(15):
        seqs.append((seqs[-1] * 3 + 1) % 128)
    ids = torch.cat(seqs, dim=1)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    model = get_peft_model(
        tiny_llama(),
        LoRAPruneConfig(
            task_type="CAUSAL_LM",
            target_sparsity=args.sparsity,
            granularity=args.granularity,
            pruning_interval=5,
            r=8,
            lora_alpha=16,
        ),
    )
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            out,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=False,
        )
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=ds, callbacks=[LoRAPruneCallback()])
        trainer.train()
        model.print_sparsity()

        model.eval()
        sample = ids[:4]
        with torch.no_grad():
            expected = model(input_ids=sample).logits
        model.save_pretrained(f"{out}/adapter")
        reloaded = PeftModel.from_pretrained(tiny_llama(), f"{out}/adapter").eval()
        with torch.no_grad():
            diff = (reloaded(input_ids=sample).logits - expected).abs().max().item()
        print(f"reloaded adapter: max |difference| = {diff:.2e}")
        merged = reloaded.merge_and_unload()
        with torch.no_grad():
            diff = (merged(input_ids=sample).logits - expected).abs().max().item()
        zeros = sum(int((m.weight == 0).sum()) for n, m in merged.named_modules() if n.endswith(("_proj",)))
        print(
            f"merged {type(merged).__name__}: max |difference| = {diff:.2e}, zero weights in projections: {zeros:,d}"
        )


if __name__ == "__main__":
    main()
