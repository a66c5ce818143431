"""The `checkpoint:` config section: Lightning's ModelCheckpoint, with step checkpoints
that a resumed run continues exactly (see scprint.trainer.resume for the data and noise)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same keys, same files), except that a step checkpoint
    (``every_n_train_steps``) due on a step that a validation loop follows is written
    after that loop, not before it.

    Written before it (ModelCheckpoint's way), the checkpoint says the validation has not
    run, yet a run resumed from it skips that validation (Lightning fast-forwards the
    validation loop's progress when it restarts on a validation step): the plateau
    scheduler, early stopping and the validation history miss a loop the uninterrupted run
    had, and the two runs part (measured: ReduceLROnPlateau's last_epoch 2 vs 3 after 12
    steps with validation every 4 and a checkpoint at step 4). Written after it, Lightning
    knows the loop ran and goes on training.

    Its state key is ModelCheckpoint's, so a checkpoint of either resumes with the other.
    Time-based saves (``train_time_interval``) are left as ModelCheckpoint makes them.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            pl_module.automatic_optimization
            and hasattr(self, "_defer_save_until_validation")  # Lightning >= 2.5's deferral
            and self._every_n_train_steps >= 1
            and trainer.global_step % self._every_n_train_steps == 0
            and not self._should_skip_saving_checkpoint(trainer)
            and not self._should_save_on_train_epoch_end(trainer)
            and validation_follows(trainer)
        ):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)


def validation_follows(trainer) -> bool:
    """Whether Lightning runs a validation loop right after the batch that just ended: the
    training epoch loop's own test (in its on_advance_end)."""
    loop = trainer.fit_loop.epoch_loop
    check = getattr(loop, "_should_check_val_fx", None)
    if check is None:  # a Lightning without it: save as ModelCheckpoint does
        return False
    return bool(check(trainer.fit_loop._data_fetcher))
