"""TRL's SFTTrainer on the tiny EVLF backend: its loss on a fixed batch is our SFT loss; a short run learns."""

import pytest
import torch

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.model.backends.evlf import EVLFBackend
from monailabel_evlf.training.config import SFTConfig, TRLConfig
from monailabel_evlf.training.samples import SampleOptions, phantom_samples
from monailabel_evlf.training.sft import sft_loss
from monailabel_evlf.training.trl_sft import build_sft_trainer, train_sft_trl

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def samples(tiny_path):
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    options = SampleOptions(box_codec=backend.box_codec, size=(48, 48), tasks=("grounding", "diagnosis"))
    phantom = make_phantom(1, shape=(40, 40, 12), n_lesions=2, study_id="p1")
    return phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=1)


def options(tmp_path):
    return TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none")


def test_trl_sft_loss_equals_ours(tiny_path, samples, tmp_path):
    backend = EVLFBackend.from_pretrained(str(tiny_path))
    with torch.no_grad():  # a LoRA that is not zero: the loss depends on the adapter
        for name, param in backend.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    trainer = build_sft_trainer(backend, samples, SFTConfig(epochs=1, batch_size=4), options(tmp_path))
    batch = samples[:4]  # answers of different lengths: padding and the token-level mean both matter
    assert len({len(s.target) for s in batch}) > 1
    collated = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    backend.train()
    theirs = trainer.compute_loss(trainer.model, collated, num_items_in_batch=(collated["labels"] != -100).sum())
    ours = sft_loss(backend, batch)
    assert torch.allclose(theirs, ours, atol=1e-5), (float(theirs), float(ours))
    labelled = int((collated["labels"][:, 1:] != -100).sum())
    scored = sum(len(backend.tokenizer(s.target, add_special_tokens=False)["input_ids"]) + 1 for s in batch)
    assert labelled == scored  # the same tokens: each answer plus its end-of-turn


def test_short_trl_sft_run_lowers_the_loss(tiny_path, samples, tmp_path):
    """With the LM head trainable (the random tiny model's final norm caps what LoRA alone moves; test_trl_grpo)."""
    backend = EVLFBackend.from_pretrained(str(tiny_path), extra_trainable="lm_head")
    backend.eval()
    with torch.no_grad():
        before = float(sft_loss(backend, samples[:4]))
    history = train_sft_trl(
        backend, samples[:4], SFTConfig(epochs=8, batch_size=4, learning_rate=0.05), options(tmp_path)
    )
    with torch.no_grad():
        after = float(sft_loss(backend, samples[:4]))
    assert len(history) == 8 and after < before - 0.5, (before, after)
    assert "forward" not in backend.model.__dict__
