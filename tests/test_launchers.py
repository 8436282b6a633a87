"""launch/slurm.sbatch and launch/tpu_pod.sh, run against stand-ins for srun, scontrol and gcloud
that record what they were asked to do (no cluster here): the processes each would start, with
the environment that joins them into one JAX job."""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DALLE3_JAX_", "JAX_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def test_slurm_sbatch_starts_one_process_per_task(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "scontrol", "#!/bin/bash\n[ \"$1 $2 $3\" = 'show hostnames gpu[03-04]' ] || exit 9\n"
                                  "printf 'gpu03\\ngpu04\\n'\n")
    # srun: run the task command once per task, as SLURM would on the nodes (2 tasks per node).
    _script(bin_dir / "srun", "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                              "for i in $(seq 0 $((SLURM_NTASKS - 1))); do\n"
                              "  SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) \"$@\" || exit $?\ndone\n")
    python = _script(tmp_path / "python", "#!/bin/bash\necho \"process $DALLE3_JAX_PROCESS_ID of "
                                          "$DALLE3_JAX_NUM_PROCESSES via $DALLE3_JAX_COORDINATOR gpu "
                                          "$JAX_LOCAL_DEVICE_IDS: $*\"\n")
    env = _env(bin_dir, SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu[03-04]", SLURM_SUBMIT_DIR=ROOT, PYTHON=python)
    cmd = ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--config=configs/t2i.py:tiny",
           "--workdir=/shared/a b"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dalle3_jax: 4 processes on 2 node(s), coordinator gpu03:24242")
    assert lines[1:] == [f"process {i} of 4 via gpu03:24242 gpu {i % 2}: launch/train.py "
                         "--config=configs/t2i.py:tiny --workdir=/shared/a b" for i in range(4)]
    outside = subprocess.run(cmd, env=_env(bin_dir, PYTHON=python), capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


def test_tpu_pod_runs_the_command_on_every_worker(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    _script(bin_dir / "gcloud", f"#!/bin/bash\nprintf '%s\\n' \"$@\" >> {log}\n")
    env = _env(bin_dir, TPU_NAME="pod", ZONE="us-central2-b", PROJECT="proj")
    script = os.path.join(ROOT, "launch", "tpu_pod.sh")
    train_args = ["--config=configs/t2i.py:caption=dsc,blend=0.95", "--workdir=/mnt/s/t2i"]
    out = subprocess.run(["bash", script, "train", *train_args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = log.read_text().splitlines()
    assert args[:8] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "us-central2-b", "--project"]
    assert "--worker=all" in args
    remote = args[args.index("--command") + 1]
    assert remote == ("cd dalle3_jax && DALLE3_JAX_DISTRIBUTED=on .venv/bin/python launch/train.py "
                      "--config=configs/t2i.py:caption=dsc\\,blend=0.95 --workdir=/mnt/s/t2i")
    # The remote shell reads the quoted arguments back unchanged.
    echoed = subprocess.run(["bash", "-c", remote.split("python ", 1)[1].replace("launch/train.py", "printf '%s\\n'")],
                            capture_output=True, text=True)
    assert echoed.stdout.splitlines() == train_args
    missing = subprocess.run(["bash", script, "setup"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "set REPO_URL" in missing.stderr
