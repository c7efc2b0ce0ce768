/*
 * mm-init: start a job's command as the init of its own PID namespace, so that
 * CRIU can dump the whole tree and restore it on any node (same PIDs inside the
 * namespace, whatever PIDs are taken outside).
 *
 *   mm-init [--uid U --gid G [--groups G1,G2,...]] [--chdir DIR] [--pid-fd N]
 *           [--env-fd N] [--status-fd N] [--allow-root] [--private-proc] -- CMD [ARGS...]
 *   mm-init --keep [--pid-fd N] [--status-fd N] -- CMD [ARGS...]
 *
 * Three processes take part:
 *   outer   the process that was exec'd. It unshares a PID namespace, forks PID 1,
 *           optionally writes PID 1's host PID to fd N, forwards signals to PID 1,
 *           and exits with PID 1's status. It is never dumped, so after the fork it
 *           writes nothing anywhere and keeps none of the job's stdio open (a byte
 *           written into the job's output would break the restore: CRIU refuses a
 *           regular file whose size changed).
 *   PID 1   ROOT-owned init of the namespace: setsid(), starts the app (at a random
 *           PID of the namespace: spread_pids() below), forwards
 *           signals to the app's process group, reaps every child, and exits with
 *           the app's status (128+N when the app was killed by signal N).
 *           With --private-proc it first enters a mount namespace of its own (see
 *           private_proc() below).
 *   app     drops supplementary groups, gid and uid to the job user's, changes to
 *           DIR, and execvp()s CMD.
 *
 * What this trusts: its argv and the fds it is given (the launcher, which runs as
 * root, builds them), and its own environment, which the launcher builds from scratch.
 * The job's environment never is mm-init's: it comes as data on --env-fd (a sealed
 * memfd of NUL-separated NAME=VALUE entries), is read by the app process only after
 * it dropped to the job user, and becomes CMD's environment at execve(). So no
 * loader or interpreter variable of the job (LD_*, GCONV_PATH, ...) ever reaches a
 * process with root credentials, whatever its name. PID 1 closes the fd once the app
 * is forked (the re-exec of --private-proc carries only the fd, never the variables).
 * Without --env-fd, CMD gets mm-init's own environment.
 *
 * uid 0 for the app is refused unless --allow-root is given: a job runs as its
 * owner, and a root app in a restorable image is the one thing images must never
 * smuggle in. --allow-root exists for root's own jobs, which an admin may run.
 *
 * --private-proc exists for GPU jobs: CUDA fails to initialise (error 304) in a PID
 * namespace whose /proc is the host's. PID 1 then unshares a mount namespace, makes
 * every mount in it private (nothing propagates back to the host), replaces /proc by
 * a proc of its PID namespace, reopens the job's stdio there and re-executes itself
 * from there (--ns-init): fds opened and mappings made outside live on the host's
 * mounts, which CRIU cannot find in the job's namespace ("Can't lookup mount=N").
 * The reopen goes through an O_PATH fd whose inode is checked against the original,
 * and runs with the job user's file-system identity (setfsuid/setfsgid and the user's
 * groups: no DAC override), so it opens nothing the user could not open by that name.
 * An O_PATH fd (search permission is all it took) is never turned into a readable
 * one: it is left as it is, as is a file that cannot be found again or that the user
 * may not open. PID 1 is the tree's root, so CRIU dumps and restores the mount
 * namespace with it (a namespace of the app alone cannot be restored). The outer
 * process stays in the host's mount namespace.
 *
 * SIGTSTP/SIGTTIN/SIGTTOU are NOT forwarded: Slurm suspends jobs with the cgroup
 * freezer, and a stopped process makes the CUDA checkpoint API hang.
 *
 * --status-fd N: the outer process writes the job's exit code ("%d\n") to fd N before
 * it exits. The node agent is the outer process's parent, and a restarted agent is no
 * longer: it reads the job's end from that file (a root-only file the agent opened).
 *
 * --keep: the parent of a tree that `criu restore --restore-sibling` brings back. It
 * runs CMD (criu) as its child; the restored tree's root becomes its child too. When
 * CMD has ended it writes CMD's exit code ("%d\n") to --pid-fd and closes it and its
 * stdio; if CMD succeeded it then waits for the restored root and exits with its code
 * (written to --status-fd first, as above). Nothing of the job runs in it.
 *
 * Exit status: the app's; 125 when mm-init itself failed, 126 when CMD could not
 * be executed, 127 when CMD was not found.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <linux/kcmp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_SELF 125
#define EXIT_CANNOT_EXEC 126
#define EXIT_NOT_FOUND 127
#define MAX_GROUPS 1024
#define MAX_ENV_BYTES (16 << 20)

/* Signals passed on to the job. CHLD is handled, not forwarded. */
static const int forwarded[] = {
	SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM, SIGCONT, SIGWINCH,
};

struct options {
	int have_uid;
	uid_t uid;
	int have_gid;
	gid_t gid;
	int have_groups;
	size_t ngroups;
	gid_t groups[MAX_GROUPS];
	const char *chdir;
	int pid_fd;
	int env_fd;
	int status_fd;
	int keep;
	int allow_root;
	int private_proc;
	int ns_init; /* internal: this is PID 1, re-executed inside its mount namespace */
	char **argv;
};

static void die(int code, const char *fmt, ...)
{
	va_list ap;

	fputs("mm-init: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	_exit(code);
}

static int parse_ulong(const char *s, unsigned long max, unsigned long *out)
{
	char *end;
	unsigned long v;

	if (!s || !*s || *s == '-' || *s == '+')
		return -1;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end || v > max)
		return -1;
	*out = v;
	return 0;
}

static void parse_groups(struct options *o, const char *arg)
{
	char *copy, *tok, *save = NULL;
	unsigned long v;

	copy = strdup(arg);
	if (!copy)
		die(EXIT_SELF, "out of memory");
	o->ngroups = 0;
	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (o->ngroups == MAX_GROUPS)
			die(EXIT_SELF, "--groups: more than %d groups", MAX_GROUPS);
		if (parse_ulong(tok, (gid_t)-2, &v))
			die(EXIT_SELF, "--groups: invalid group id '%s'", tok);
		o->groups[o->ngroups++] = (gid_t)v;
	}
	free(copy);
	o->have_groups = 1;
}

static void usage(void)
{
	die(EXIT_SELF, "usage: mm-init [--uid U --gid G [--groups G1,G2,...]] "
		       "[--chdir DIR] [--pid-fd N] [--env-fd N] [--allow-root] [--private-proc] "
		       "-- CMD [ARGS...]");
}

static void parse_args(struct options *o, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"uid", required_argument, NULL, 'u'},
		{"gid", required_argument, NULL, 'g'},
		{"groups", required_argument, NULL, 'G'},
		{"chdir", required_argument, NULL, 'C'},
		{"pid-fd", required_argument, NULL, 'p'},
		{"env-fd", required_argument, NULL, 'e'},
		{"status-fd", required_argument, NULL, 's'},
		{"keep", no_argument, NULL, 'K'},
		{"allow-root", no_argument, NULL, 'R'},
		{"private-proc", no_argument, NULL, 'P'},
		{"ns-init", no_argument, NULL, 'I'},
		{NULL, 0, NULL, 0},
	};
	unsigned long v;
	int c;

	memset(o, 0, sizeof(*o));
	o->pid_fd = -1;
	o->env_fd = -1;
	o->status_fd = -1;
	opterr = 0;
	/* '+': stop at the first non-option, CMD's own options are not ours. */
	while ((c = getopt_long(argc, argv, "+", longopts, NULL)) != -1) {
		switch (c) {
		case 'u':
			if (parse_ulong(optarg, (uid_t)-2, &v))
				die(EXIT_SELF, "--uid: invalid user id '%s'", optarg);
			o->uid = (uid_t)v;
			o->have_uid = 1;
			break;
		case 'g':
			if (parse_ulong(optarg, (gid_t)-2, &v))
				die(EXIT_SELF, "--gid: invalid group id '%s'", optarg);
			o->gid = (gid_t)v;
			o->have_gid = 1;
			break;
		case 'G':
			parse_groups(o, optarg);
			break;
		case 'C':
			if (!*optarg)
				die(EXIT_SELF, "--chdir: empty directory");
			o->chdir = optarg;
			break;
		case 'p':
			if (parse_ulong(optarg, INT_MAX, &v) || v <= 2)
				die(EXIT_SELF, "--pid-fd: invalid fd '%s' (must be > 2)", optarg);
			o->pid_fd = (int)v;
			break;
		case 'e':
			if (parse_ulong(optarg, INT_MAX, &v) || v <= 2)
				die(EXIT_SELF, "--env-fd: invalid fd '%s' (must be > 2)", optarg);
			o->env_fd = (int)v;
			break;
		case 's':
			if (parse_ulong(optarg, INT_MAX, &v) || v <= 2)
				die(EXIT_SELF, "--status-fd: invalid fd '%s' (must be > 2)", optarg);
			o->status_fd = (int)v;
			break;
		case 'K':
			o->keep = 1;
			break;
		case 'R':
			o->allow_root = 1;
			break;
		case 'P':
			o->private_proc = 1;
			break;
		case 'I':
			o->ns_init = 1;
			break;
		default:
			usage();
		}
	}
	/* CMD must follow "--": a command that looks like an option is never ours. */
	if (optind < 1 || strcmp(argv[optind - 1], "--") != 0 || optind >= argc)
		usage();
	if (o->have_uid != o->have_gid)
		die(EXIT_SELF, "--uid and --gid go together");
	if (o->have_groups && !o->have_uid)
		die(EXIT_SELF, "--groups needs --uid and --gid");
	if (o->keep && (o->have_uid || o->have_groups || o->chdir || o->env_fd >= 0 || o->private_proc))
		die(EXIT_SELF, "--keep takes only --pid-fd and --status-fd");
	if ((o->have_uid ? o->uid : getuid()) == 0 && !o->allow_root && !o->keep)
		die(EXIT_SELF, "refusing to run the command as root (no --allow-root)");
	if (o->ns_init) {
		if (getpid() != 1)
			die(EXIT_SELF, "--ns-init is mm-init's own, for PID 1 of its namespace");
		o->pid_fd = -1; /* the outer process's; closed before the re-exec */
		o->status_fd = -1;
	}
	if (o->pid_fd >= 0 && fcntl(o->pid_fd, F_GETFD) < 0)
		die(EXIT_SELF, "--pid-fd %d: %s", o->pid_fd, strerror(errno));
	if (o->env_fd >= 0 && (fcntl(o->env_fd, F_GETFD) < 0 || o->env_fd == o->pid_fd))
		die(EXIT_SELF, "--env-fd %d: %s", o->env_fd, o->env_fd == o->pid_fd ? "same as --pid-fd" : strerror(errno));
	if (o->status_fd >= 0 && (fcntl(o->status_fd, F_GETFD) < 0 || o->status_fd == o->pid_fd ||
				  o->status_fd == o->env_fd))
		die(EXIT_SELF, "--status-fd %d: %s", o->status_fd,
		    fcntl(o->status_fd, F_GETFD) < 0 ? strerror(errno) : "same as another fd");
	o->argv = argv + optind;
}

static void fill_sigset(sigset_t *set)
{
	size_t i;

	if (sigemptyset(set))
		die(EXIT_SELF, "sigemptyset: %s", strerror(errno));
	for (i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
		if (sigaddset(set, forwarded[i]))
			die(EXIT_SELF, "sigaddset: %s", strerror(errno));
	if (sigaddset(set, SIGCHLD))
		die(EXIT_SELF, "sigaddset: %s", strerror(errno));
}

static int is_forwarded(int sig)
{
	size_t i;

	for (i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
		if (forwarded[i] == sig)
			return 1;
	return 0;
}

/* Point 0, 1 and 2 at /dev/null: a process that is not the job keeps none of its stdio. */
static int stdio_to_devnull(void)
{
	int fd, i;

	fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -1;
	for (i = 0; i <= 2; i++)
		if (fd != i && dup2(fd, i) < 0)
			return -1;
	if (fd > 2 && close(fd))
		return -1;
	return 0;
}

static int status_to_exit(int status)
{
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return EXIT_SELF;
}

/* The credentials PID 1 had before it took the job user's file-system identity. */
struct fs_identity {
	int switched;
	uid_t fsuid;
	gid_t fsgid;
	int ngroups;
	gid_t groups[MAX_GROUPS];
};

/*
 * Opens from here on are checked as the job user's: fsuid/fsgid and supplementary
 * groups are the user's, and the kernel drops the file-system capabilities (DAC
 * override and search) from the effective set while fsuid is not 0. Nothing to do
 * when mm-init does not change users or the job is root's own (--allow-root, uid 0).
 */
static void take_owner_fs_identity(const struct options *o, struct fs_identity *saved)
{
	saved->switched = 0;
	if (!o->have_uid || o->uid == 0 || geteuid() != 0)
		return;
	saved->ngroups = getgroups(MAX_GROUPS, saved->groups);
	if (saved->ngroups < 0)
		die(EXIT_SELF, "getgroups: %s", strerror(errno));
	if (setgroups(o->ngroups, o->ngroups ? o->groups : NULL))
		die(EXIT_SELF, "setgroups: %s", strerror(errno));
	saved->fsgid = (gid_t)setfsgid(o->gid);
	saved->fsuid = (uid_t)setfsuid(o->uid);
	if ((uid_t)setfsuid((uid_t)-1) != o->uid || (gid_t)setfsgid((gid_t)-1) != o->gid)
		die(EXIT_SELF, "cannot take the job user's file-system identity");
	saved->switched = 1;
}

static void give_back_fs_identity(const struct fs_identity *saved)
{
	if (!saved->switched)
		return;
	setfsuid(saved->fsuid);
	setfsgid(saved->fsgid);
	if ((uid_t)setfsuid((uid_t)-1) != saved->fsuid || (gid_t)setfsgid((gid_t)-1) != saved->fsgid ||
	    setgroups((size_t)saved->ngroups, saved->groups))
		die(EXIT_SELF, "cannot restore PID 1's own credentials");
}

/*
 * Give fd `fd` a new open file description of the same file, opened in this (new)
 * mount namespace; same access mode, flags and offset. Only regular files and
 * character devices: pipes, sockets and the like belong to no mount. The caller has
 * taken the job user's file-system identity: the open is the user's. Returns 0 when
 * done or not needed, -1 with errno set on failure. Left as it is (the job runs, and a
 * later dump says which file CRIU could not place): a file that cannot be found again
 * by its name (deleted, renamed, replaced), one the user may not open, and an O_PATH
 * fd (it grants no reading or writing, and must not come back as a readable fd).
 */
static int reopen_here(int fd)
{
	char link[64], path[PATH_MAX];
	struct stat was, now;
	ssize_t n;
	off_t pos;
	int flags, opath, nfd, keep;

	flags = fcntl(fd, F_GETFL);
	if (flags < 0)
		return errno == EBADF ? 0 : -1;
	if (flags & O_PATH)
		return 0;
	if (fstat(fd, &was))
		return -1;
	if (!S_ISREG(was.st_mode) && !S_ISCHR(was.st_mode))
		return 0;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, path, sizeof(path) - 1);
	if (n < 0)
		return -1;
	path[n] = '\0';
	if (path[0] != '/')
		return 0;
	/* O_PATH opens nothing (no device open, no FIFO wait): safe on any path. */
	opath = open(path, O_PATH | O_CLOEXEC);
	if (opath < 0)
		return 0;
	if (fstat(opath, &now) || now.st_dev != was.st_dev || now.st_ino != was.st_ino ||
	    (now.st_mode & S_IFMT) != (was.st_mode & S_IFMT) || now.st_rdev != was.st_rdev) {
		close(opath);
		return 0;
	}
	/* Through the O_PATH fd: exactly the inode just checked, found in this namespace. */
	snprintf(link, sizeof(link), "/proc/self/fd/%d", opath);
	keep = flags & (O_ACCMODE | O_APPEND | O_NONBLOCK | O_DSYNC | O_SYNC | O_DIRECT | O_NOATIME);
	nfd = open(link, keep | O_NOCTTY | O_CLOEXEC);
	close(opath);
	if (nfd < 0)
		return (errno == EACCES || errno == EPERM) ? 0 : -1;
	pos = lseek(fd, 0, SEEK_CUR);
	if (pos > 0 && lseek(nfd, pos, SEEK_SET) != pos) {
		close(nfd);
		return -1;
	}
	/* dup2 clears close-on-exec on fd: the app gets it. */
	if (dup2(nfd, fd) < 0) {
		close(nfd);
		return -1;
	}
	return close(nfd);
}

/* PID 1 of the namespace: a mount namespace of its own with /proc of its PID namespace. */
static void private_proc(const struct options *o)
{
	struct fs_identity saved;
	int fd, same_as[3], j;
	pid_t self = getpid();

	if (unshare(CLONE_NEWNS))
		die(EXIT_SELF, "unshare(CLONE_NEWNS): %s", strerror(errno));
	/* Before any mount: with shared mounts, /proc below would appear on the host too. */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
		die(EXIT_SELF, "making mounts private: %s", strerror(errno));
	/*
	 * Detached rather than mounted over: CRIU restores an overmounted mount through a
	 * temporary directory in /tmp that it then cannot remove (EBUSY, one left per
	 * restore). procfs is one tree for every instance but the PID directories, so the
	 * new one still shows /proc/driver/nvidia and the like.
	 */
	if (umount2("/proc", MNT_DETACH) && errno != EINVAL)
		die(EXIT_SELF, "detaching the host's /proc: %s", strerror(errno));
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL))
		die(EXIT_SELF, "mount proc on /proc: %s", strerror(errno));
	/* 2>&1 stays one open file description (one offset), as the job was given it. */
	for (fd = 0; fd <= 2; fd++) {
		same_as[fd] = -1;
		for (j = 0; j < fd && same_as[fd] < 0; j++)
			if (syscall(SYS_kcmp, self, self, KCMP_FILE, j, fd) == 0)
				same_as[fd] = j;
	}
	take_owner_fs_identity(o, &saved);
	for (fd = 0; fd <= 2; fd++) {
		if (same_as[fd] >= 0) {
			if (dup2(same_as[fd], fd) < 0)
				die(EXIT_SELF, "dup2: %s", strerror(errno));
		} else if (reopen_here(fd)) {
			die(EXIT_SELF, "reopening fd %d in the job's mount namespace: %s", fd, strerror(errno));
		}
	}
	give_back_fs_identity(&saved);
}

/*
 * PID 1 becomes mm-init again, loaded from inside its mount namespace: a process keeps
 * the mappings of its last exec, and mm-init's were made on the host's mounts, where
 * CRIU cannot find them ("Can't lookup mount=N for fd=-3"). The binary is found by
 * its name here and must be the very inode that is running. Never returns.
 */
static void reexec_here(int argc, char **argv)
{
	char path[PATH_MAX];
	struct stat was, now;
	char **args;
	ssize_t n;
	int fd, i;

	n = readlink("/proc/self/exe", path, sizeof(path) - 1);
	if (n < 0 || stat("/proc/self/exe", &was))
		die(EXIT_SELF, "/proc/self/exe: %s", strerror(errno));
	path[n] = '\0';
	fd = open(path, O_PATH | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &now) || now.st_dev != was.st_dev || now.st_ino != was.st_ino)
		die(EXIT_SELF, "cannot find myself (%s) in the job's mount namespace", path);
	args = calloc((size_t)argc + 2, sizeof(*args));
	if (!args)
		die(EXIT_SELF, "out of memory");
	args[0] = argv[0];
	args[1] = "--ns-init";
	for (i = 1; i < argc; i++)
		args[i + 1] = argv[i];
	if (fflush(stderr) == EOF)
		die(EXIT_SELF, "fflush: %s", strerror(errno));
	syscall(SYS_execveat, fd, "", args, environ, AT_EMPTY_PATH);
	die(EXIT_SELF, "re-executing %s: %s", path, strerror(errno));
}

/*
 * The job's environment as read from --env-fd: NUL-separated NAME=VALUE entries (an
 * entry without '=' or with an empty name is dropped). Read in the app process after
 * the privilege drop; it is data here, never this process's own environment.
 */
static char **job_environment(int fd)
{
	struct stat st;
	size_t len, done = 0, i, count = 1;
	char *buf, **envp;
	ssize_t got;

	if (fstat(fd, &st))
		die(EXIT_SELF, "--env-fd: %s", strerror(errno));
	if (st.st_size < 0 || st.st_size > MAX_ENV_BYTES)
		die(EXIT_SELF, "--env-fd: an environment of %lld bytes is too large", (long long)st.st_size);
	len = (size_t)st.st_size;
	buf = malloc(len + 1);
	if (!buf)
		die(EXIT_SELF, "out of memory");
	while (done < len) {
		got = pread(fd, buf + done, len - done, (off_t)done);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			die(EXIT_SELF, "--env-fd: short read: %s", got < 0 ? strerror(errno) : "end of file");
		done += (size_t)got;
	}
	buf[len] = '\0';
	for (i = 0; i < len; i++)
		count += buf[i] == '\0';
	envp = calloc(count + 1, sizeof(*envp));
	if (!envp)
		die(EXIT_SELF, "out of memory");
	count = 0;
	for (i = 0; i < len; i += strlen(buf + i) + 1)
		if (buf[i] != '=' && strchr(buf + i, '='))
			envp[count++] = buf + i;
	envp[count] = NULL;
	return envp;
}

/* Runs in the app process: becomes the job user, then executes CMD. Never returns. */
static void exec_app(const struct options *o)
{
	sigset_t none;
	size_t i;

	/* A process group of its own: PID 1's group is 1, and kill(-1) means "everyone". */
	if (setpgid(0, 0))
		die(EXIT_SELF, "setpgid: %s", strerror(errno));
	for (i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
		if (signal(forwarded[i], SIG_DFL) == SIG_ERR)
			die(EXIT_SELF, "signal: %s", strerror(errno));
	if (sigemptyset(&none) || sigprocmask(SIG_SETMASK, &none, NULL))
		die(EXIT_SELF, "sigprocmask: %s", strerror(errno));

	if (o->have_uid) {
		if (setgroups(o->ngroups, o->ngroups ? o->groups : NULL))
			die(EXIT_SELF, "setgroups: %s", strerror(errno));
		if (setresgid(o->gid, o->gid, o->gid))
			die(EXIT_SELF, "setresgid(%u): %s", (unsigned)o->gid, strerror(errno));
		if (setresuid(o->uid, o->uid, o->uid))
			die(EXIT_SELF, "setresuid(%u): %s", (unsigned)o->uid, strerror(errno));
	}
	if (!o->allow_root) {
		uid_t r, e, s;

		/* Paranoia: the drop must be irrevocable before running user code. */
		if (getresuid(&r, &e, &s) || r == 0 || e == 0 || s == 0)
			die(EXIT_SELF, "still root after dropping privileges");
		if (setresuid(0, 0, 0) == 0)
			die(EXIT_SELF, "could regain root after dropping privileges");
	}
	/* Only now, as the job user: the job's environment becomes ours for execvp (PATH). */
	if (o->env_fd >= 0) {
		environ = job_environment(o->env_fd);
		if (close(o->env_fd))
			die(EXIT_SELF, "close --env-fd: %s", strerror(errno));
	}
	/* After the drop: the user's permissions decide whether DIR can be entered. */
	if (o->chdir && chdir(o->chdir))
		die(EXIT_SELF, "cannot change directory to %s: %s", o->chdir, strerror(errno));

	execvp(o->argv[0], o->argv);
	die(errno == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC, "%s: %s", o->argv[0], strerror(errno));
}

/*
 * Start the app at a random PID of the namespace, as on any node. In a fresh namespace
 * every job's script would otherwise be PID 2 and its first children 3, 4, ...: names
 * made of a PID (`/tmp/out.$$`, Open MPI's PRRTE session directory) then collide
 * between jobs on a node's shared /tmp, and a rerun finds its killed run's leftovers.
 * PID 1 is alone in the namespace and root in it, so writing ns_last_pid cannot race.
 * Best effort: without it the PIDs are sequential, which is still correct.
 */
static void spread_pids(void)
{
	unsigned int r = 0;
	long max = 32768;
	char buf[32];
	FILE *f;
	int n;

	f = fopen("/proc/sys/kernel/pid_max", "re");
	if (f) {
		if (fscanf(f, "%ld", &max) != 1 || max > 32768)
			max = 32768;  /* five digits, as tools that print PIDs expect */
		fclose(f);
	}
	if (max < 8192 || syscall(SYS_getrandom, &r, sizeof(r), 0) != (long)sizeof(r))
		return;
	/* Above the kernel's reserved 300, and room for 4096 PIDs before any wrap. */
	n = snprintf(buf, sizeof(buf), "%ld", 300 + (long)(r % (unsigned long)(max - 300 - 4096)));
	f = fopen("/proc/sys/kernel/ns_last_pid", "we");
	if (!f)
		return;
	fwrite(buf, 1, (size_t)n, f);
	fclose(f);
}

/* PID 1 of the namespace. Never returns. */
static void run_init(const struct options *o, const sigset_t *waitset)
{
	struct timespec tick = {1, 0};
	siginfo_t info;
	pid_t app, p;
	int status, sig;

	if (setsid() < 0)
		die(EXIT_SELF, "setsid: %s", strerror(errno));
	spread_pids();
	app = fork();
	if (app < 0)
		die(EXIT_SELF, "fork: %s", strerror(errno));
	if (app == 0)
		exec_app(o);
	/* The app has the job's environment; none of it stays with PID 1 (nor in an image). */
	if (o->env_fd >= 0 && close(o->env_fd))
		die(EXIT_SELF, "close --env-fd: %s", strerror(errno));
	/* Both sides set the group, so that no signal can reach PID 1's group by a race. */
	if (setpgid(app, app) && errno != EACCES && errno != ESRCH)
		die(EXIT_SELF, "setpgid: %s", strerror(errno));
	/* "/" exists on every node a tree may be restored on; DIR might not matter to PID 1. */
	if (chdir("/"))
		die(EXIT_SELF, "chdir /: %s", strerror(errno));
	if (stdio_to_devnull())
		_exit(EXIT_SELF);

	for (;;) {
		/*
		 * The timeout makes a lost SIGCHLD (e.g. around a dump) cost a second at most,
		 * never a job that cannot end. EINTR happens when CRIU seizes us.
		 */
		sig = sigtimedwait(waitset, &info, &tick);
		if (sig > 0 && is_forwarded(sig)) {
			if (kill(-app, sig) && errno == ESRCH)
				kill(app, sig);
		} else if (sig < 0 && errno != EAGAIN && errno != EINTR) {
			_exit(EXIT_SELF);
		}
		while ((p = waitpid(-1, &status, WNOHANG)) > 0) {
			/* Orphans are just reaped; the app's end is the job's end. */
			if (p == app)
				_exit(status_to_exit(status));
		}
		if (p < 0 && errno == ECHILD)
			_exit(EXIT_SELF);
	}
}

/* The job's end, for an agent that is no longer this process's parent. Best effort. */
static void write_status(int fd, int code)
{
	char buf[16];
	int n;

	if (fd < 0)
		return;
	n = snprintf(buf, sizeof(buf), "%d\n", code);
	if (n > 0 && write(fd, buf, (size_t)n) == n)
		fsync(fd);
	close(fd);
}

/* --keep: the parent of a restored tree (see the top of this file). Never returns. */
static void keep(const struct options *o, const sigset_t *waitset)
{
	char buf[16];
	pid_t cmd, p;
	int status, code, n;

	cmd = fork();
	if (cmd < 0)
		die(EXIT_SELF, "fork: %s", strerror(errno));
	if (cmd == 0) {
		sigset_t none;

		if (o->status_fd >= 0)
			close(o->status_fd);
		if (o->pid_fd >= 0)
			close(o->pid_fd);
		if (sigemptyset(&none) || sigprocmask(SIG_SETMASK, &none, NULL))
			die(EXIT_SELF, "sigprocmask: %s", strerror(errno));
		execvp(o->argv[0], o->argv);
		die(errno == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC, "%s: %s", o->argv[0], strerror(errno));
	}
	while ((p = waitpid(cmd, &status, 0)) < 0 && errno == EINTR)
		;
	code = p == cmd ? status_to_exit(status) : EXIT_SELF;
	if (o->pid_fd >= 0) {
		n = snprintf(buf, sizeof(buf), "%d\n", code);
		if (n < 0 || write(o->pid_fd, buf, (size_t)n) != n)
			code = EXIT_SELF;
		close(o->pid_fd);
	}
	/* Keep nothing the caller handed criu (the job's new stdio among them). */
	if (o->status_fd > 3)
		syscall(SYS_close_range, 3U, (unsigned)o->status_fd - 1, 0U);
	syscall(SYS_close_range, (unsigned)(o->status_fd >= 3 ? o->status_fd + 1 : 3), ~0U, 0U);
	if (stdio_to_devnull() || code != 0) {
		/* Nothing was restored (or nobody will hear of it): reap what criu left. */
		while (waitpid(-1, &status, 0) > 0 || errno == EINTR)
			;
		_exit(code ? code : EXIT_SELF);
	}
	(void)waitset;
	for (;;) {
		p = waitpid(-1, &status, 0);
		if (p > 0) {
			write_status(o->status_fd, status_to_exit(status));
			_exit(status_to_exit(status));
		}
		if (errno != EINTR) {
			write_status(o->status_fd, EXIT_SELF);
			_exit(EXIT_SELF);
		}
	}
}

int main(int argc, char **argv)
{
	struct options o;
	sigset_t waitset;
	siginfo_t info;
	char buf[32];
	pid_t init, p;
	int status, sig, n;

	parse_args(&o, argc, argv);
	fill_sigset(&waitset);
	/* Blocked before the fork: no signal is lost between fork and sigtimedwait. */
	if (sigprocmask(SIG_BLOCK, &waitset, NULL))
		die(EXIT_SELF, "sigprocmask: %s", strerror(errno));
	if (o.ns_init)
		run_init(&o, &waitset); /* the mask and pending signals survived the exec */
	if (o.keep)
		keep(&o, &waitset);
	if (unshare(CLONE_NEWPID))
		die(EXIT_SELF, "unshare(CLONE_NEWPID): %s", strerror(errno));
	if (fflush(stderr) == EOF)
		die(EXIT_SELF, "fflush: %s", strerror(errno));

	init = fork();
	if (init < 0)
		die(EXIT_SELF, "fork: %s", strerror(errno));
	if (init == 0) {
		if (o.pid_fd >= 0 && close(o.pid_fd))
			die(EXIT_SELF, "close pid fd: %s", strerror(errno));
		/* The tree is dumped; the status file is the outer process's alone. */
		if (o.status_fd >= 0 && close(o.status_fd))
			die(EXIT_SELF, "close status fd: %s", strerror(errno));
		if (o.private_proc) {
			private_proc(&o);
			reexec_here(argc, argv);
		}
		run_init(&o, &waitset);
	}

	/* Outer process: from here on, silent. */
	if (o.env_fd >= 0 && close(o.env_fd)) {
		kill(init, SIGKILL);
		_exit(EXIT_SELF);
	}
	if (o.pid_fd >= 0) {
		n = snprintf(buf, sizeof(buf), "%d\n", (int)init);
		if (n < 0 || write(o.pid_fd, buf, (size_t)n) != n || close(o.pid_fd)) {
			kill(init, SIGKILL);
			_exit(EXIT_SELF);
		}
	}
	if (stdio_to_devnull()) {
		kill(init, SIGKILL);
		_exit(EXIT_SELF);
	}
	for (;;) {
		sig = sigwaitinfo(&waitset, &info);
		if (sig > 0 && is_forwarded(sig))
			kill(init, sig);
		else if (sig < 0 && errno != EINTR)
			_exit(EXIT_SELF);
		p = waitpid(init, &status, WNOHANG);
		if (p == init) {
			write_status(o.status_fd, status_to_exit(status));
			_exit(status_to_exit(status));
		}
		if (p < 0 && errno != EINTR)
			_exit(EXIT_SELF);
	}
}
