"""One process of the two-process training test (`test_multihost.py`): `python multihost_worker.py PROCESS PORT FOLDER`.
Two CPU devices per process, so the two processes hold the 2 x 2 data x model mesh between them. It first tries to
train into FOLDER/users (a user's folder, which process 0 refuses: every process must fail, none may hang), then
trains a whole run, then a run stopped after two steps and resumed, and prints each run's losses as a JSON line."""
import json
import os
import sys

process_id, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")   # collectives between CPU processes
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from multihost_case import case_config, case_datasets  # noqa: E402
from jora.train import train_lora  # noqa: E402

config = case_config(folder)
train, test = case_datasets(folder, config)
try:
    train_lora(config, train, f"{folder}/users", progress=False)
    refused = "not refused"
except ValueError as error:
    refused = f"{type(error).__name__}: {error}"
whole = train_lora(config, train, f"{folder}/whole", eval_dataset=test, progress=False)
part = train_lora(config, train, f"{folder}/parts", progress=False, stop_after=2)
rest = train_lora(config, train, f"{folder}/parts", progress=False)
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "refused": refused,
                              "whole": [r["loss"] for r in whole.history],
                              "eval": [r["eval_loss"] for r in whole.history if "eval_loss" in r],
                              "part": [r["loss"] for r in part.history], "rest": [r["loss"] for r in rest.history]}),
      flush=True)
