/*
 * slurm_mm SPANK plugin: registers --checkpoint-interval and hands each SPANK
 * callback to the file of the context that runs it (mm_alloc.c for sbatch/salloc,
 * mm_stepd.c for slurmstepd). The logic lives in Python; the C stays small.
 */
#include <stdint.h>
#include <stdio.h>
#include <slurm/spank.h>

#include "mm_plugin.h"

SPANK_PLUGIN(slurm_mm, 1);

struct mm_config mm_cfg;
long mm_interval;

static int opt_interval(int val, const char *optarg, int remote)
{
	long secs = mm_parse_interval(optarg);
	(void)val;
	if (secs < 0) {
		slurm_error("--checkpoint-interval: invalid value '%s' (use minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]], 30m, 2h or off)",
			    optarg ? optarg : "");
		return -1;
	}
	if (secs > 0 && secs < mm_cfg.min_interval && !remote) {
		slurm_error("--checkpoint-interval: '%s' is shorter than this site's minimum of %ld seconds",
			    optarg, mm_cfg.min_interval);
		return -1;
	}
	mm_interval = secs;
	return 0;
}

static struct spank_option interval_option = {
	"checkpoint-interval", "time",
	"Checkpoint this job every <time> (Slurm time format, or 30m, 2h, off) so that it "
	"survives preemption, drains and node failures (slurm_mm)",
	1, 0, opt_interval,
};

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (mm_config_parse(&mm_cfg, ac, av) < 0)
		return -1;
	/* sbatch ignores a static spank_options[] table: register explicitly. */
	if (spank_option_register(sp, &interval_option) != ESPANK_SUCCESS) {
		slurm_error("slurm_mm: cannot register --checkpoint-interval");
		return -1;
	}
	return 0;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	if (spank_context() == S_CTX_ALLOCATOR || spank_context() == S_CTX_LOCAL)
		return mm_alloc_init_post_opt(sp);
	return 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	if (spank_context() == S_CTX_REMOTE)
		return mm_stepd_user_init(sp);
	return 0;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	if (spank_context() == S_CTX_REMOTE)
		return mm_stepd_task_init(sp);
	return 0;
}
