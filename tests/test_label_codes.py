"""A label code the model's labels hierarchy has no row for is a clear error, raised on the
CPU before the batch moves to the device (it used to be a bare IndexError in
the classification loss: a device-side assert on CUDA)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_trainer import HIERARCHY, batches, module
from torch.utils.data import DataLoader

from scprint.model import losses
from scprint.trainer.trainer import TrainingMode

SETS = {
    "organism": losses.label_sets(2, None),
    "cell_type": losses.label_sets(3, HIERARCHY["cell_type"]),
}


def test_known_codes_unknown_and_parents_pass():
    classes = torch.tensor([[0, -1], [1, 0], [-1, 2], [0, 3]])  # 3: parent of leaves 0, 1
    losses.check_label_codes(classes, SETS)


def test_code_beyond_the_hierarchy_names_class_code_and_fix():
    classes = torch.tensor([[0, 1], [1, 5]])
    with pytest.raises(ValueError) as err:
        losses.check_label_codes(classes, SETS)
    message = str(err.value)
    assert "class cell_type: label code 5" in message
    assert "leaf codes 0-2 and parent codes [3]" in message
    assert "Fix:" in message and "labels_hierarchy" in message


def test_parent_row_without_leaves_is_refused_not_a_meaningless_loss():
    sets = {"cell_type": losses.label_sets(3, {4: [0, 2]})}  # code 3: a gap, no leaves
    logits = torch.zeros(1, 3)
    assert losses.classification(logits, torch.tensor([3]), sets["cell_type"]) > 1e30
    with pytest.raises(ValueError, match="label code 3 has no row"):
        losses.check_label_codes(torch.tensor([[3]]), sets)


def test_training_on_mismatched_data_stops_with_the_clear_error():
    data = batches(2)
    data[1]["class"][0, 1] = 7  # another data module's encoding
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TrainingMode()],
    )  # fmt: skip
    with pytest.raises(ValueError, match="class cell_type: label code 7 has no row"):
        trainer.fit(module(), DataLoader(data, batch_size=None))
