/*
 * libmm_prlimit.so: LD_PRELOAD for criu, and for criu only, on hosts where root
 * lacks CAP_SYS_RESOURCE (CapEff bit 24 clear).
 *
 * Without that capability the kernel lets a process read another's rlimits only
 * when the caller's REAL uid/gid equal the target's real, effective and saved ids
 * (check_prlimit_permission). `criu dump` of a user-owned process then fails with
 * "Can't get rlimit 0: Operation not permitted". CRIU 4.2.1 reads them with
 * syscall(__NR_prlimit64, ...) (cr-dump.c, dump_task_rlimits) and calls prlimit64()
 * elsewhere, so this wraps syscall() for that one number, and prlimit64()/prlimit():
 * when a READ of another process's limits is refused with EPERM, it answers from
 * /proc/PID/limits (written by the kernel, readable by anyone) instead.
 *
 * It never changes criu's credentials: a criu whose real uid were the job user's, even
 * for one call, could be stopped or killed by that user in the middle of a dump.
 * Setting another process's limits is not emulated (the refusal stands).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

typedef long (*syscall_fn)(long, ...);

static syscall_fn real_syscall(void)
{
	static syscall_fn fn;

	if (!fn)
		fn = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
	return fn;
}

static long raw_prlimit64(pid_t pid, int resource, const void *new_limit, void *old_limit)
{
	syscall_fn fn = real_syscall();

	if (!fn) {
		errno = ENOSYS;
		return -1;
	}
	return fn(SYS_prlimit64, (long)pid, (long)resource, (long)new_limit, (long)old_limit);
}

/* RLIM_INFINITY for "unlimited", else the number; -1 on anything else. */
static int parse_limit(const char *word, rlim64_t *out)
{
	char *end;
	unsigned long long v;

	if (!strcmp(word, "unlimited")) {
		*out = RLIM64_INFINITY;
		return 0;
	}
	errno = 0;
	v = strtoull(word, &end, 10);
	if (errno || end == word || *end)
		return -1;
	*out = (rlim64_t)v;
	return 0;
}

/*
 * Limit `resource` of `pid` from /proc/PID/limits: a header line, then one line per
 * resource in RLIMIT_* order, each "%-25s %-20s %-20s %-10s" (name, soft, hard, units).
 */
static int limits_from_proc(pid_t pid, int resource, struct rlimit64 *out)
{
	char path[64], line[256], soft[32], hard[32];
	int index = -1, ok = -1;
	FILE *f;

	if (resource < 0 || snprintf(path, sizeof(path), "/proc/%d/limits", (int)pid) >= (int)sizeof(path))
		return -1;
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (index++ != resource)
			continue;
		if (strlen(line) > 26 && sscanf(line + 26, "%31s %31s", soft, hard) == 2 &&
		    !parse_limit(soft, &out->rlim_cur) && !parse_limit(hard, &out->rlim_max))
			ok = 0;
		break;
	}
	fclose(f);
	return ok;
}

static long prlimit_as_target(pid_t pid, int resource, const void *new_limit, void *old_limit)
{
	long ret;
	int err;

	ret = raw_prlimit64(pid, resource, new_limit, old_limit);
	if (ret == 0 || errno != EPERM || pid == 0 || pid == getpid() || new_limit || !old_limit)
		return ret;
	err = errno;
	if (limits_from_proc(pid, resource, (struct rlimit64 *)old_limit)) {
		errno = err;
		return -1;
	}
	return 0;
}

int prlimit64(pid_t pid, __rlimit_resource_t resource, const struct rlimit64 *new_limit,
	      struct rlimit64 *old_limit)
{
	return (int)prlimit_as_target(pid, (int)resource, new_limit, old_limit);
}

/* On 64-bit glibc prlimit is the same call; callers may link either name. */
int prlimit(pid_t pid, __rlimit_resource_t resource, const struct rlimit *new_limit,
	    struct rlimit *old_limit)
{
	_Static_assert(sizeof(struct rlimit) == sizeof(struct rlimit64),
		       "prlimit and prlimit64 differ on this platform");
	return prlimit64(pid, resource, (const struct rlimit64 *)new_limit,
			 (struct rlimit64 *)old_limit);
}

/*
 * Every other syscall() goes straight through. Like glibc's own syscall(), this
 * takes six arguments whatever the number needs: extra ones are ignored by the kernel.
 */
long syscall(long number, ...)
{
	syscall_fn fn = real_syscall();
	va_list ap;
	long a[6];
	int i;

	va_start(ap, number);
	for (i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	if (number == SYS_prlimit64)
		return prlimit_as_target((pid_t)a[0], (int)a[1], (const void *)a[2], (void *)a[3]);
	if (!fn) {
		errno = ENOSYS;
		return -1;
	}
	return fn(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
