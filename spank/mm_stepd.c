/*
 * slurmstepd side (runs as the job's user): tell the job its interval and wrap the
 * batch task so that slurm_mm starts (or restores) it under its supervision.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "mm_plugin.h"

static int is_batch_step(spank_t sp)
{
	uint32_t stepid = 0;
	if (spank_get_item(sp, S_JOB_STEPID, &stepid) != ESPANK_SUCCESS)
		return 0;
	return stepid == SLURM_BATCH_SCRIPT;
}

int mm_stepd_user_init(spank_t sp)
{
	char buf[32];
	if (mm_interval <= 0)
		return 0;
	snprintf(buf, sizeof(buf), "%ld", mm_interval);
	if (spank_setenv(sp, "SLURM_MM_CHECKPOINT_INTERVAL", buf, 1) != ESPANK_SUCCESS) {
		slurm_error("slurm_mm: could not set SLURM_MM_CHECKPOINT_INTERVAL");
		return -1;
	}
	return 0;
}

/*
 * The task is about to exec its batch script. Point argv[0] at slurm_mm's run
 * wrapper and hand it the script's path in SLURM_MM_SCRIPT: everything else Slurm
 * does before the exec (cgroups, stdio, task prolog, environment) stays as it is.
 */
/*
 * A task of an srun step that slurm_mm's node agent launched for an enrolled job (its
 * environment carries the agent's step token): wrap it like the batch task, so that the
 * agent starts it under slurm_mm (or restores it) and a checkpoint carries it. Other
 * steps run untouched.
 */
static int step_task_init(spank_t sp)
{
	static char wrapper[sizeof(mm_cfg.run_wrapper)];
	char token[64];
	int argc = 0;
	char **argv = NULL;

	if (spank_getenv(sp, "SLURM_MM_STEP_TOKEN", token, sizeof(token)) != ESPANK_SUCCESS || !token[0])
		return 0;
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
	    access(mm_cfg.run_wrapper, X_OK) != 0) {
		slurm_error("slurm_mm: cannot wrap this step's task; it runs without checkpoints");
		return 0;
	}
	if (spank_setenv(sp, "SLURM_MM_SCRIPT", argv[0], 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "SLURM_MM_AGENT_SOCKET", mm_cfg.agent_socket, 1) != ESPANK_SUCCESS) {
		slurm_error("slurm_mm: cannot pass the step's command; it runs without checkpoints");
		return 0;
	}
	snprintf(wrapper, sizeof(wrapper), "%s", mm_cfg.run_wrapper);
	argv[0] = wrapper;
	return 0;
}

int mm_stepd_task_init(spank_t sp)
{
	static char wrapper[sizeof(mm_cfg.run_wrapper)];
	int argc = 0;
	char **argv = NULL;

	if (!is_batch_step(sp))
		return step_task_init(sp);
	if (mm_interval <= 0)
		return 0;
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1) {
		slurm_error("slurm_mm: cannot read the batch script's argv; job runs unprotected");
		return 0;
	}
	if (access(mm_cfg.run_wrapper, X_OK) != 0) {
		slurm_error("slurm_mm: run wrapper %s is missing; job runs unprotected",
			    mm_cfg.run_wrapper);
		return 0;
	}
	if (spank_setenv(sp, "SLURM_MM_SCRIPT", argv[0], 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "SLURM_MM_AGENT_SOCKET", mm_cfg.agent_socket, 1) != ESPANK_SUCCESS) {
		slurm_error("slurm_mm: cannot pass the batch script path; job runs unprotected");
		return 0;
	}
	snprintf(wrapper, sizeof(wrapper), "%s", mm_cfg.run_wrapper);
	argv[0] = wrapper;
	return 0;
}
