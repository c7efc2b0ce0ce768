/*
 * mm-init: start a job's command as the init of its own PID namespace, so that
 * CRIU can dump the whole tree and restore it on any node (same PIDs inside the
 * namespace, whatever PIDs are taken outside).
 *
 *   mm-init [--uid U --gid G [--groups G1,G2,...]] [--chdir DIR] [--pid-fd N]
 *           [--allow-root] -- CMD [ARGS...]
 *
 * Three processes take part:
 *   outer   the process that was exec'd. It unshares a PID namespace, forks PID 1,
 *           optionally writes PID 1's host PID to fd N, forwards signals to PID 1,
 *           and exits with PID 1's status. It is never dumped, so after the fork it
 *           writes nothing anywhere and keeps none of the job's stdio open (a byte
 *           written into the job's output would break the restore: CRIU refuses a
 *           regular file whose size changed).
 *   PID 1   ROOT-owned init of the namespace: setsid(), starts the app, forwards
 *           signals to the app's process group, reaps every child, and exits with
 *           the app's status (128+N when the app was killed by signal N).
 *   app     drops supplementary groups, gid and uid to the job user's, changes to
 *           DIR, and execvp()s CMD.
 *
 * What this trusts: its argv and the fds it is given (the launcher, which runs as
 * root, builds them). Nothing from the environment steers the privileged part; the
 * environment is only passed on to CMD.
 *
 * uid 0 for the app is refused unless --allow-root is given: a job runs as its
 * owner, and a root app in a restorable image is the one thing images must never
 * smuggle in. --allow-root exists for root's own jobs, which an admin may run.
 *
 * SIGTSTP/SIGTTIN/SIGTTOU are NOT forwarded: Slurm suspends jobs with the cgroup
 * freezer, and a stopped process makes the CUDA checkpoint API hang.
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
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_SELF 125
#define EXIT_CANNOT_EXEC 126
#define EXIT_NOT_FOUND 127
#define MAX_GROUPS 1024

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
	int allow_root;
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
		       "[--chdir DIR] [--pid-fd N] [--allow-root] -- CMD [ARGS...]");
}

static void parse_args(struct options *o, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"uid", required_argument, NULL, 'u'},
		{"gid", required_argument, NULL, 'g'},
		{"groups", required_argument, NULL, 'G'},
		{"chdir", required_argument, NULL, 'C'},
		{"pid-fd", required_argument, NULL, 'p'},
		{"allow-root", no_argument, NULL, 'R'},
		{NULL, 0, NULL, 0},
	};
	unsigned long v;
	int c;

	memset(o, 0, sizeof(*o));
	o->pid_fd = -1;
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
		case 'R':
			o->allow_root = 1;
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
	if ((o->have_uid ? o->uid : getuid()) == 0 && !o->allow_root)
		die(EXIT_SELF, "refusing to run the command as root (no --allow-root)");
	if (o->pid_fd >= 0 && fcntl(o->pid_fd, F_GETFD) < 0)
		die(EXIT_SELF, "--pid-fd %d: %s", o->pid_fd, strerror(errno));
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
	/* After the drop: the user's permissions decide whether DIR can be entered. */
	if (o->chdir && chdir(o->chdir))
		die(EXIT_SELF, "cannot change directory to %s: %s", o->chdir, strerror(errno));

	execvp(o->argv[0], o->argv);
	die(errno == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC, "%s: %s", o->argv[0], strerror(errno));
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
	app = fork();
	if (app < 0)
		die(EXIT_SELF, "fork: %s", strerror(errno));
	if (app == 0)
		exec_app(o);
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
		run_init(&o, &waitset);
	}

	/* Outer process: from here on, silent. */
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
		if (p == init)
			_exit(status_to_exit(status));
		if (p < 0 && errno != EINTR)
			_exit(EXIT_SELF);
	}
}
