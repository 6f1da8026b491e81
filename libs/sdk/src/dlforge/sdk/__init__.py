"""dlforge SDK: describe a model and its data, its hyperparameters and how to run it; run it.

    from dlforge.sdk import Estimator, Experiment, HParams, RunConfig

    job = Experiment.run(
        experiment_name="elpv-effnet",
        estimator=Estimator(weights_key="proposer/models/efficientnet_lite0-imagenet.pt",
                            manifest_key="augmenter/…/manifest.json", classes=["defect", "good"]),
        hyper_parameters=HParams(lr=1e-3, batch_size=32, epochs=3, unfreeze=1),
        run_config=RunConfig(no_of_workers=2, checkpoint_every_steps=50),
    )
    job.wait_until_finish()
    job.metrics            # one dict per epoch: train/val loss, val accuracy, per-class recall
    job.get_tensorboard_url()  # on a trainer service: where it serves the job's TensorBoard scalars

The job runs in this process (``InProcessTransport``, the default: needs ``dlforge-sdk[local]``) or
on a trainer service (``HttpTransport("http://trainer:8000")``); both behave the same.
"""

from dlforge.sdk.config import Estimator, HParams, RunConfig
from dlforge.sdk.experiment import Experiment, Job, JobFailed
from dlforge.sdk.transports import HttpTransport, InProcessTransport, ServesTensorBoard, Transport

__all__ = [
    "Estimator",
    "Experiment",
    "HParams",
    "HttpTransport",
    "InProcessTransport",
    "Job",
    "JobFailed",
    "RunConfig",
    "ServesTensorBoard",
    "Transport",
]
