/* Memory that must come back bit for bit: argv[1] MB of private anonymous memory and
 * 4 MB of shared anonymous memory (shared with a child process) filled with a
 * pseudo-random pattern. At GO, the pattern is regenerated and compared, and the child
 * checks the shared region too. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t next(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void fill(uint64_t *p, size_t words, uint64_t seed)
{
	for (size_t i = 0; i < words; i++)
		p[i] = next(&seed);
}

static size_t mismatches(const uint64_t *p, size_t words, uint64_t seed)
{
	size_t bad = 0;

	for (size_t i = 0; i < words; i++)
		if (p[i] != next(&seed))
			bad++;
	return bad;
}

static void wait_go(void)
{
	struct timespec ts = {0, 20000000};

	while (access("GO", F_OK) != 0)
		nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 200;
	size_t words = mb * 1024 * 1024 / 8, swords = 4 * 1024 * 1024 / 8, bad, sbad;
	uint64_t *priv, *shared;
	pid_t child;
	int status;

	setvbuf(stdout, NULL, _IOLBF, 0);
	priv = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	shared = mmap(NULL, swords * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (priv == MAP_FAILED || shared == MAP_FAILED) {
		printf("FAIL: mmap\n");
		return 1;
	}
	fill(priv, words, 0x9e3779b97f4a7c15ULL);
	fill(shared, swords, 0x2545f4914f6cdd1dULL);
	child = fork();
	if (child == 0) {
		wait_go();
		return mismatches(shared, swords, 0x2545f4914f6cdd1dULL) ? 1 : 0;
	}
	printf("READY %zu MB\n", mb);
	wait_go();
	bad = mismatches(priv, words, 0x9e3779b97f4a7c15ULL);
	sbad = mismatches(shared, swords, 0x2545f4914f6cdd1dULL);
	if (waitpid(child, &status, 0) != child) {
		printf("FAIL: lost the child\n");
		return 1;
	}
	if (bad || sbad || !WIFEXITED(status) || WEXITSTATUS(status)) {
		printf("FAIL: %zu private and %zu shared words differ, child status %d\n", bad, sbad, status);
		return 1;
	}
	printf("PASS: %zu MB private + 4 MB shared intact, child agrees\n", mb);
	return 0;
}
