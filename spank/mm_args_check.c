/*
 * Test driver for mm_args.c (tests/test_spank_args.py), not part of the plugin:
 *   mm_args_check interval TEXT     prints the seconds, or "invalid"
 *   mm_args_check config [ARG...]   prints the parsed plugstack.conf values, or the error
 * slurm_error() is defined here so the parser's messages reach stderr.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <slurm/spank.h>

#include "mm_args.h"

void slurm_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("error: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

int main(int argc, char **argv)
{
	struct mm_config cfg;

	if (argc == 3 && !strcmp(argv[1], "interval")) {
		long secs = mm_parse_interval(argv[2]);
		if (secs < 0)
			printf("invalid\n");
		else
			printf("%ld\n", secs);
		return 0;
	}
	if (argc >= 2 && !strcmp(argv[1], "config")) {
		memset(&cfg, 0x55, sizeof(cfg)); /* garbage: every field must be set */
		if (mm_config_parse(&cfg, argc - 2, argv + 2) < 0)
			return 1;
		printf("min_interval=%ld\nrun_wrapper=%s\nagent_socket=%s\n",
		       cfg.min_interval, cfg.run_wrapper, cfg.agent_socket);
		return 0;
	}
	fprintf(stderr, "usage: mm_args_check interval TEXT | config [ARG...]\n");
	return 2;
}
