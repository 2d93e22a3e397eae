"""The training-framework half of ``tests/test_training_frameworks.py``: short real
training runs of :class:`mvn_core.adapters.torch.MVNGrad` inside Hugging Face's
``transformers.Trainer`` and PyTorch Lightning, each checkpointed, resumed from the
checkpoint, and compared with the uninterrupted run.  Prints one JSON line.

Run in a process of its own: both frameworks import much, and this process hides
torchvision (see :func:`uninstalled`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import tempfile


def uninstalled(package: str) -> None:
    """Make ``package`` look uninstalled to this process: its import fails as a missing
    module's does, and its distribution's metadata is not found.

    The test setup installs torchvision for timm (whose optimizers the conformance
    checks load without it); the wheel it gets is built against a CUDA torch, and fails
    to import beside the CPU torch.  transformers and Lightning (through torchmetrics)
    import torchvision when they find it installed; neither needs it for what runs here.
    """
    sys.modules[package] = None
    find = importlib.metadata.distribution

    def distribution(name):
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return find(name)

    importlib.metadata.distribution = distribution


uninstalled("torchvision")

import torch  # noqa: E402

from mvn_core.adapters.torch import MVNGrad  # noqa: E402


def largest_difference(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# --- Hugging Face transformers.Trainer ------------------------------------------------------------

def hf_trainer(folder):
    """A one-layer BERT (from a config: no download) learns whether the first token of
    a random sequence is in the upper half of the vocabulary; 24 steps, a checkpoint
    every 10, then a run resumed from step 10 to 24."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (96, 8), generator=generator)
    data = [{"input_ids": i, "labels": label} for i, label in zip(ids, (ids[:, 0] >= 16).long())]

    def run(output_dir, resume=None):
        torch.manual_seed(1 if resume else 0)  # resumed: the weights come from the checkpoint
        model = transformers.BertForSequenceClassification(config)
        optimizer = MVNGrad(model.parameters(), lr=1e-2, weight_decay=0.01)
        scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 2, 24)
        args = transformers.TrainingArguments(
            output_dir=output_dir, max_steps=24, per_device_train_batch_size=8,
            save_strategy="steps", save_steps=10, logging_steps=1, report_to=[], use_cpu=True,
            seed=0, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizers=(optimizer, scheduler))
        trainer.train(resume_from_checkpoint=resume)
        return model, {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    whole, losses = run(os.path.join(folder, "whole"))
    checkpoint = os.path.join(folder, "whole", "checkpoint-10")
    saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)
    resumed, resumed_losses = run(os.path.join(folder, "resumed"), resume=checkpoint)
    return {"losses": [losses[step] for step in sorted(losses)],
            "checkpoints": sorted(os.listdir(os.path.join(folder, "whole"))),
            "saved_rule": saved["param_groups"][0]["rule"],
            "saved_steps": sorted({int(s["step"]) for s in saved["state"].values()}),
            "resumed_losses": [resumed_losses[step] for step in sorted(resumed_losses) if step > 10],
            "difference": largest_difference(whole, resumed)}


# --- PyTorch Lightning -------------------------------------------------------------------------

def lightning(folder):
    """A small regression MLP, 4 epochs of 6 batches with a step-wise learning-rate
    schedule, a checkpoint every epoch, then a run resumed from the end of epoch 2."""
    import lightning as L

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 8, generator=generator)
    y = torch.tanh(x @ torch.randn(8, 1, generator=generator))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 1))
            self.losses = []

        def training_step(self, batch, index):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            optimizer = MVNGrad(self.parameters(), lr=1e-2, weight_decay=0.01)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.5)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def run(directory, resume=None):
        torch.manual_seed(1 if resume else 0)
        model = Regressor()
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=directory, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
        trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[checkpoints], deterministic=True)
        trainer.fit(model, loader, ckpt_path=resume)
        return model

    whole = run(os.path.join(folder, "whole"))
    names = sorted(os.listdir(os.path.join(folder, "whole")))
    checkpoint = os.path.join(folder, "whole", "epoch=1-step=12.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    resumed = run(os.path.join(folder, "resumed"), resume=checkpoint)
    return {"losses": whole.losses, "checkpoints": names,
            "saved_rule": saved["optimizer_states"][0]["param_groups"][0]["rule"],
            "saved_steps": sorted({int(s["step"]) for s in
                                   saved["optimizer_states"][0]["state"].values()}),
            "saved_lr": saved["optimizer_states"][0]["param_groups"][0]["lr"],
            "resumed_losses": resumed.losses, "difference": largest_difference(whole, resumed)}


def main():
    with tempfile.TemporaryDirectory() as folder:
        report = {"transformers": hf_trainer(os.path.join(folder, "hf")),
                  "lightning": lightning(os.path.join(folder, "lightning"))}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
