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
 * when the real call fails with EPERM for another process, it sets criu's real
 * uid/gid to the target's for that one call (the effective uid stays 0, so no
 * capability is dropped), retries, and puts the real ids back.
 *
 * What this trusts: /proc/PID/status of the target (written by the kernel). It does
 * nothing unless it runs with effective uid 0 and the plain call was refused. If the
 * real ids cannot be put back, it aborts rather than let criu go on as someone else.
 * While the ids are switched (one syscall), the target's user may signal criu.
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

/* The target's real uid and gid, from the "Uid:" and "Gid:" lines of /proc/PID/status. */
static int target_ids(pid_t pid, uid_t *uid, gid_t *gid)
{
	char path[64], line[256];
	unsigned long u = 0, g = 0;
	int have_u = 0, have_g = 0;
	FILE *f;

	if (snprintf(path, sizeof(path), "/proc/%d/status", (int)pid) >= (int)sizeof(path))
		return -1;
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, "Uid:", 4))
			have_u = sscanf(line + 4, "%lu", &u) == 1;
		else if (!strncmp(line, "Gid:", 4))
			have_g = sscanf(line + 4, "%lu", &g) == 1;
	}
	if (fclose(f) || !have_u || !have_g)
		return -1;
	*uid = (uid_t)u;
	*gid = (gid_t)g;
	return 0;
}

static long prlimit_as_target(pid_t pid, int resource, const void *new_limit, void *old_limit)
{
	uid_t ruid, euid, suid, tuid;
	gid_t rgid, egid, sgid, tgid;
	long ret;
	int err;

	ret = raw_prlimit64(pid, resource, new_limit, old_limit);
	if (ret == 0 || errno != EPERM || pid == 0 || pid == getpid())
		return ret;
	err = errno;
	if (getresuid(&ruid, &euid, &suid) || getresgid(&rgid, &egid, &sgid) || euid != 0 ||
	    target_ids(pid, &tuid, &tgid)) {
		errno = err;
		return -1;
	}
	if (setresgid(tgid, (gid_t)-1, (gid_t)-1)) {
		errno = err;
		return -1;
	}
	if (setresuid(tuid, (uid_t)-1, (uid_t)-1)) {
		if (setresgid(rgid, (gid_t)-1, (gid_t)-1))
			abort();
		errno = err;
		return -1;
	}
	ret = raw_prlimit64(pid, resource, new_limit, old_limit);
	err = errno;
	if (setresuid(ruid, (uid_t)-1, (uid_t)-1) || setresgid(rgid, (gid_t)-1, (gid_t)-1))
		abort();
	errno = err;
	return ret;
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
