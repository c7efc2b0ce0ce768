/* State shared by the per-context files of the slurm_mm SPANK plugin. */
#ifndef MM_PLUGIN_H
#define MM_PLUGIN_H

#include <stdint.h>
#include <slurm/spank.h>

#include "mm_args.h"

extern struct mm_config mm_cfg;
extern long mm_interval; /* seconds; 0 = not enrolled */

int mm_alloc_init_post_opt(spank_t sp);  /* sbatch / salloc */
int mm_stepd_user_init(spank_t sp);      /* slurmstepd, as the user */
int mm_stepd_task_init(spank_t sp);      /* slurmstepd task, as the user */

#endif
