/*
 * libmm_unixsk.so: LD_PRELOAD for `criu restore`, and for criu only.
 *
 * CRIU brings a bound unix socket back by its path, as root (criu/sk-unix.c): it
 * unlinks a stale socket file at the path, binds the new socket there, then sets the
 * file's owner and mode by the path again (fchownat/fchmodat, following links). The
 * job's owner controls that path: a directory swapped for a symlink between any check
 * and these calls would have root unlink a service's socket, create a socket where only
 * root may, or chown a root file to the owner.
 *
 * With MM_SOCKET_OWNER=UID:GID[:G1,G2,...] in the environment (set by the agent, never
 * by a job), each of those calls runs with the owner's filesystem credentials (fsuid,
 * fsgid and supplementary groups of the calling thread only, put back at once):
 *   - bind() and connect() of an AF_UNIX socket to a path name;
 *   - unlinkat()/unlink() of a socket file (not of anything else);
 *   - fchownat()/fchmodat() of the path this thread last bound.
 * The kernel then resolves every component of the path as the owner, and a change of
 * fsuid away from 0 drops CAP_CHOWN, CAP_DAC_OVERRIDE and CAP_FOWNER for the call: what
 * the owner could not do fails, and CRIU's restore fails with it. Real and effective
 * ids never change, so the user can never signal or trace criu.
 * Abstract names (CRIU's own transport sockets) and every other call go straight through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_GROUPS 256

static int owner_known = -1; /* -1: not parsed yet, 0: no owner (pass through), 1: owner */
static uid_t owner_uid;
static gid_t owner_gid;
static gid_t owner_groups[MAX_GROUPS];
static int owner_ngroups;

static __thread char last_bound[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];

static int parse_owner(void)
{
	const char *s = getenv("MM_SOCKET_OWNER");
	char *end;
	unsigned long v;

	if (owner_known >= 0)
		return owner_known;
	owner_known = 0;
	if (!s)
		return 0;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end != ':' || v == 0 || v > UINT_MAX - 1)
		return 0;
	owner_uid = (uid_t)v;
	s = end + 1;
	v = strtoul(s, &end, 10);
	if (errno || end == s || (*end && *end != ':') || v > UINT_MAX - 1)
		return 0;
	owner_gid = (gid_t)v;
	owner_ngroups = 0;
	if (*end == ':') {
		s = end + 1;
		while (*s && owner_ngroups < MAX_GROUPS) {
			v = strtoul(s, &end, 10);
			if (errno || end == s || (*end && *end != ',') || v > UINT_MAX - 1)
				return 0;
			owner_groups[owner_ngroups++] = (gid_t)v;
			s = *end ? end + 1 : end;
		}
	}
	owner_known = 1;
	return 1;
}

struct saved_creds {
	int fsuid, fsgid, ngroups;
	gid_t groups[MAX_GROUPS];
};

static void become_root_again(const struct saved_creds *saved)
{
	int err = errno;

	syscall(SYS_setfsuid, saved->fsuid);
	syscall(SYS_setfsgid, saved->fsgid);
	syscall(SYS_setgroups, saved->ngroups, saved->groups);
	if ((int)syscall(SYS_setfsuid, -1) != saved->fsuid || (int)syscall(SYS_setfsgid, -1) != saved->fsgid)
		abort(); /* never go on with half-changed credentials */
	errno = err;
}

/* Raw syscalls: glibc's setgroups() would change every thread of the process. On
 * failure nothing is left changed. */
static int become_owner(struct saved_creds *saved)
{
	saved->ngroups = (int)syscall(SYS_getgroups, MAX_GROUPS, saved->groups);
	if (saved->ngroups < 0)
		return -1;
	saved->fsuid = (int)syscall(SYS_setfsuid, -1);
	saved->fsgid = (int)syscall(SYS_setfsgid, -1);
	if (syscall(SYS_setgroups, owner_ngroups, owner_groups))
		return -1;
	syscall(SYS_setfsgid, owner_gid);
	syscall(SYS_setfsuid, owner_uid);
	if ((uid_t)syscall(SYS_setfsuid, -1) != owner_uid || (gid_t)syscall(SYS_setfsgid, -1) != owner_gid) {
		become_root_again(saved);
		return -1;
	}
	return 0;
}

static void *next(const char *name)
{
	void *fn = dlsym(RTLD_NEXT, name);

	if (!fn)
		abort();
	return fn;
}

/* The path of a sockaddr_un with a path name, or NULL (abstract, unnamed, other family). */
static const char *unix_path(const struct sockaddr *addr, socklen_t len, char *buf, size_t size)
{
	const struct sockaddr_un *un = (const struct sockaddr_un *)addr;
	size_t n;

	if (!addr || len <= offsetof(struct sockaddr_un, sun_path) || addr->sa_family != AF_UNIX)
		return NULL;
	n = len - offsetof(struct sockaddr_un, sun_path);
	if (n > sizeof(un->sun_path))
		n = sizeof(un->sun_path);
	if (n == 0 || un->sun_path[0] == '\0' || n >= size)
		return NULL;
	memcpy(buf, un->sun_path, n);
	buf[n] = '\0';
	return buf;
}

#define AS_OWNER(call)                                                   \
	do {                                                             \
		struct saved_creds saved;                                \
		int ret_;                                                \
		if (become_owner(&saved)) {                              \
			errno = EPERM;                                   \
			return -1;                                       \
		}                                                        \
		ret_ = (call);                                           \
		become_root_again(&saved);                               \
		return ret_;                                             \
	} while (0)

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	static int (*real)(int, const struct sockaddr *, socklen_t);
	char path[sizeof(last_bound)];

	if (!real)
		real = next("bind");
	if (!parse_owner() || !unix_path(addr, len, path, sizeof(path)))
		return real(fd, addr, len);
	memcpy(last_bound, path, sizeof(last_bound));
	AS_OWNER(real(fd, addr, len));
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	static int (*real)(int, const struct sockaddr *, socklen_t);
	char path[sizeof(last_bound)];

	if (!real)
		real = next("connect");
	if (!parse_owner() || !unix_path(addr, len, path, sizeof(path)))
		return real(fd, addr, len);
	AS_OWNER(real(fd, addr, len));
}

static int is_socket_file(int dirfd, const char *path)
{
	struct stat st;

	return fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode);
}

int unlinkat(int dirfd, const char *path, int flags)
{
	static int (*real)(int, const char *, int);

	if (!real)
		real = next("unlinkat");
	if (!parse_owner() || flags || !is_socket_file(dirfd, path))
		return real(dirfd, path, flags);
	AS_OWNER(real(dirfd, path, flags));
}

int unlink(const char *path)
{
	static int (*real)(const char *);

	if (!real)
		real = next("unlink");
	if (!parse_owner() || !is_socket_file(AT_FDCWD, path))
		return real(path);
	AS_OWNER(real(path));
}

static int is_last_bound(int dirfd, const char *path)
{
	return dirfd == AT_FDCWD && path && last_bound[0] && !strcmp(path, last_bound);
}

int fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
	static int (*real)(int, const char *, uid_t, gid_t, int);

	if (!real)
		real = next("fchownat");
	if (!parse_owner() || !is_last_bound(dirfd, path))
		return real(dirfd, path, uid, gid, flags);
	AS_OWNER(real(dirfd, path, uid, gid, flags));
}

int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
	static int (*real)(int, const char *, mode_t, int);

	if (!real)
		real = next("fchmodat");
	if (!parse_owner() || !is_last_bound(dirfd, path))
		return real(dirfd, path, mode, flags);
	AS_OWNER(real(dirfd, path, mode, flags));
}
