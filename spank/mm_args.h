/* Parsing of slurm_mm's option values and plugstack.conf arguments. */
#ifndef MM_ARGS_H
#define MM_ARGS_H

#define MM_MAX_INTERVAL (365L * 86400L)
#define MM_MAX_SOCKET_PATH 100 /* sun_path is 108 bytes, leave room for %n */

struct mm_config {
	long min_interval;   /* seconds; shorter intervals are refused by sbatch */
	char run_wrapper[4096]; /* the batch task is exec'd through this on the node */
	char agent_socket[4096]; /* node agent's socket; %n = node name */
};

/* Seconds for a Slurm time string (30, 30:00, 1:00:00, 1-0, 30m, 2h, off -> 0);
 * -1 when the text is not a valid interval. Same grammar as slurm_mm/durations.py. */
long mm_parse_interval(const char *text);

/* Fill *cfg from plugstack.conf arguments; -1 (with an error logged) on a bad one. */
int mm_config_parse(struct mm_config *cfg, int ac, char **av);

#endif
