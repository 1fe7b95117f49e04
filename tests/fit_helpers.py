"""Lightning callbacks shared by the tests that stop and resume fits."""

from lightning.pytorch import Callback


class StopAt(Callback):
    """Ends the fit (``should_stop``) once the global step reaches ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True
