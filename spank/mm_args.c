/* Option and plugstack.conf argument parsing; no SPANK calls except for logging. */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <slurm/spank.h>

#include "mm_args.h"
#include "mm_defaults.h"

/* Read up to `max` unsigned decimal fields separated by `sep` from *p. */
static int read_fields(const char **p, char sep, long *out, int max)
{
	int n = 0;
	while (n < max) {
		if (!isdigit((unsigned char)**p))
			return -1;
		long v = 0;
		while (isdigit((unsigned char)**p)) {
			v = v * 10 + (**p - '0');
			if (v > MM_MAX_INTERVAL)
				return -1;
			(*p)++;
		}
		out[n++] = v;
		if (n == max || **p != sep)
			break;
		(*p)++;
	}
	return n;
}

static long clock_seconds(const long *f, int n)
{
	switch (n) {
	case 1: return f[0] * 60;                         /* minutes */
	case 2: return f[1] > 59 ? -1 : f[0] * 60 + f[1]; /* min:sec */
	case 3: return (f[1] > 59 || f[2] > 59) ? -1 : (f[0] * 60 + f[1]) * 60 + f[2];
	}
	return -1;
}

long mm_parse_interval(const char *text)
{
	char buf[64];
	size_t len;
	const char *p;
	long f[4] = {0, 0, 0, 0}, secs;
	int n;

	if (!text)
		return -1;
	while (isspace((unsigned char)*text))
		text++;
	len = strlen(text);
	while (len && isspace((unsigned char)text[len - 1]))
		len--;
	if (len == 0 || len >= sizeof(buf))
		return -1;
	for (size_t i = 0; i < len; i++)
		buf[i] = tolower((unsigned char)text[i]);
	buf[len] = '\0';

	if (!strcmp(buf, "off") || !strcmp(buf, "none") || !strcmp(buf, "0"))
		return 0;
	p = buf;
	if (strchr(buf, '-')) { /* days-hours[:minutes[:seconds]] */
		if (read_fields(&p, '-', f, 1) != 1 || *p != '-')
			return -1;
		p++;
		n = read_fields(&p, ':', f + 1, 3);
		if (n < 1 || *p || f[1] > 23 || f[2] > 59 || f[3] > 59)
			return -1;
		secs = ((f[0] * 24 + f[1]) * 60 + f[2]) * 60 + f[3];
	} else {
		n = read_fields(&p, ':', f, 3);
		if (n == 1 && p[0] && !p[1] && strchr("smhd", p[0])) {
			long unit = p[0] == 's' ? 1 : p[0] == 'm' ? 60 : p[0] == 'h' ? 3600 : 86400;
			secs = f[0] * unit;
		} else if (n >= 1 && !*p) {
			secs = clock_seconds(f, n);
		} else {
			return -1;
		}
	}
	if (secs <= 0 || secs > MM_MAX_INTERVAL)
		return -1;
	return secs;
}

static int set_path(char *dst, size_t size, const char *key, const char *path)
{
	if (path[0] != '/' || strstr(path, "..") || strlen(path) >= size) {
		slurm_error("slurm_mm: plugstack.conf: %s must be an absolute path, got '%s'", key, path);
		return -1;
	}
	for (const char *c = path; *c; c++) {
		if (iscntrl((unsigned char)*c) || isspace((unsigned char)*c)) {
			slurm_error("slurm_mm: plugstack.conf: %s must not contain spaces or control characters, got '%s'",
				    key, path);
			return -1;
		}
	}
	snprintf(dst, size, "%s", path);
	return 0;
}

int mm_config_parse(struct mm_config *cfg, int ac, char **av)
{
	/* Every argument has a default (slurm_mm/defaults.py): a bare plugstack line works. */
	cfg->min_interval = MM_DEFAULT_MIN_INTERVAL;
	snprintf(cfg->run_wrapper, sizeof(cfg->run_wrapper), "%s", MM_DEFAULT_RUN_WRAPPER);
	snprintf(cfg->agent_socket, sizeof(cfg->agent_socket), "%s", MM_DEFAULT_AGENT_SOCKET);
	for (int i = 0; i < ac; i++) {
		if (!strncmp(av[i], "min_interval=", 13)) {
			long v = mm_parse_interval(av[i] + 13);
			if (v <= 0 || !av[i][13]) {
				slurm_error("slurm_mm: plugstack.conf: invalid min_interval '%s'", av[i] + 13);
				return -1;
			}
			cfg->min_interval = v;
		} else if (!strncmp(av[i], "run_wrapper=", 12)) {
			if (set_path(cfg->run_wrapper, sizeof(cfg->run_wrapper), "run_wrapper", av[i] + 12) < 0)
				return -1;
		} else if (!strncmp(av[i], "agent_socket=", 13)) {
			/* A unix socket path must fit sun_path (108 bytes) once %n is expanded. */
			if (set_path(cfg->agent_socket, MM_MAX_SOCKET_PATH, "agent_socket", av[i] + 13) < 0)
				return -1;
		} else {
			slurm_error("slurm_mm: plugstack.conf: unknown argument '%s'", av[i]);
			return -1;
		}
	}
	return 0;
}
