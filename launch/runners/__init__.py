"""Runners start a sweep's points: ``local`` (this machine), ``slurm`` (a job array),
``tpu_vm`` (gcloud ssh to every worker of a TPU VM slice, or an xpk workload)."""
