/* sbatch/salloc side: pass an enrolled job's interval to prolog and epilog. */
#include <stdint.h>
#include <stdio.h>
#include <slurm/spank.h>

#include "mm_plugin.h"

int mm_alloc_init_post_opt(spank_t sp)
{
	char buf[32];
	if (mm_interval <= 0)
		return 0;
	snprintf(buf, sizeof(buf), "%ld", mm_interval);
	/* Reaches Prolog/Epilog as SPANK_SLURM_MM_INTERVAL and survives requeue. */
	if (spank_job_control_setenv(sp, "SLURM_MM_INTERVAL", buf, 1) != ESPANK_SUCCESS)
		slurm_error("slurm_mm: could not pass the checkpoint interval to the prolog");
	return 0;
}
