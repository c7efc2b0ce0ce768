/*
 * bench-app: the benchmark workload. A compute job with a known amount of memory that
 * measures, itself, what a checkpoint costs it (zdtm-style: the app reports, the harness
 * does not guess).
 *
 *   bench-app --mem-mib N [--random-pct P] [--layout interleaved|split]
 *             [--work-us U] --stats FILE
 *       Fill N MiB of anonymous memory (P% random bytes, the rest structured, low-entropy
 *       data), then loop forever. Each iteration does about U microseconds of arithmetic
 *       on a cache-sized array and dirties one word of the big region. The app records
 *       every gap between two iteration ends longer than the stall threshold (a freeze
 *       by CRIU shows up as one such gap) and rewrites FILE in place (pwrite at offset 0,
 *       fixed size, so a restored copy passes CRIU's file size check) every 20 ms and
 *       after every stall.
 *
 *   bench-app --fill-file PATH --mem-mib N [--random-pct P] [--layout ...]
 *       Write the same memory content to PATH and exit (store benchmarks without CRIU).
 *
 * Memory content, in 2 MiB blocks: random blocks are xorshift64* output (incompressible);
 * structured blocks hold int64 words `index * 24 + (random byte)`, like index arrays and
 * counters with some noise (zstd level 3 packs them about 5x). "interleaved" alternates
 * the two kinds through the region, "split" puts all random blocks first.
 *
 * Stats file (text, 8192 bytes, space padded):
 *   pid P / iters N / now_ns T / work_us U / mem_mib M / max_gap_ns G / typ_gap_ns g /
 *   stalls K / then K lines "END_NS GAP_NS" (the newest 200).
 * Times are CLOCK_MONOTONIC, the same clock as Python's time.monotonic_ns().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (2u << 20)
#define STATS_SIZE 8192
#define MAX_STALLS 200
#define SMALL_WORDS (32 * 1024) /* 256 KiB: stays in cache */
#define STATS_EVERY_NS 20000000ull

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_random(void)
{
	uint64_t x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "bench-app: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* Block b is random when the running share of random blocks would fall short of pct. */
static int block_is_random(size_t b, size_t nblocks, int pct, int split)
{
	if (split)
		return b * 100 < (size_t)pct * nblocks;
	return ((b + 1) * (size_t)pct) / 100 > (b * (size_t)pct) / 100;
}

static void fill_block(uint64_t *w, size_t b, int random)
{
	size_t n = BLOCK / sizeof(uint64_t);
	uint64_t base = (uint64_t)b * n;
	for (size_t i = 0; i < n; i++)
		w[i] = random ? next_random() : (base + i) * 24 + (next_random() & 0xff);
}

static void fill(uint8_t *mem, size_t bytes, int pct, int split)
{
	size_t nblocks = bytes / BLOCK;
	for (size_t b = 0; b < nblocks; b++)
		fill_block((uint64_t *)(mem + b * BLOCK), b, block_is_random(b, nblocks, pct, split));
}

struct stall {
	uint64_t end_ns, gap_ns;
};

static struct stall stalls[MAX_STALLS];
static unsigned long nstalls;

static void write_stats(int fd, uint64_t iters, uint64_t t, int work_us, size_t mem_mib,
			uint64_t max_gap, uint64_t typ_gap)
{
	static char buf[STATS_SIZE];
	int len = snprintf(buf, sizeof(buf),
			   "pid %d\niters %llu\nnow_ns %llu\nwork_us %d\nmem_mib %zu\nmax_gap_ns %llu\n"
			   "typ_gap_ns %llu\nstalls %lu\n",
			   getpid(), (unsigned long long)iters, (unsigned long long)t, work_us, mem_mib,
			   (unsigned long long)max_gap, (unsigned long long)typ_gap, nstalls);
	unsigned long first = nstalls > MAX_STALLS ? nstalls - MAX_STALLS : 0;
	for (unsigned long i = first; i < nstalls && len < STATS_SIZE - 64; i++) {
		struct stall *s = &stalls[i % MAX_STALLS];
		len += snprintf(buf + len, sizeof(buf) - len, "%llu %llu\n",
				(unsigned long long)s->end_ns, (unsigned long long)s->gap_ns);
	}
	memset(buf + len, ' ', STATS_SIZE - len);
	buf[STATS_SIZE - 1] = '\n';
	if (pwrite(fd, buf, STATS_SIZE, 0) != STATS_SIZE)
		die("writing stats");
}

static uint64_t small[SMALL_WORDS];

static uint64_t work(long rounds)
{
	uint64_t acc = 0;
	for (long r = 0; r < rounds; r++) {
		for (size_t i = 0; i < SMALL_WORDS; i += 8) {
			small[i] = small[i] * 6364136223846793005ull + 1442695040888963407ull;
			acc ^= small[i];
		}
	}
	return acc;
}

int main(int argc, char **argv)
{
	size_t mem_mib = 0;
	int pct = 50, split = 0, work_us = 1000;
	const char *stats_path = NULL, *fill_path = NULL;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v) {
			fprintf(stderr, "bench-app: %s needs a value\n", a);
			return 2;
		}
		if (!strcmp(a, "--mem-mib"))
			mem_mib = strtoull(v, NULL, 10);
		else if (!strcmp(a, "--random-pct"))
			pct = atoi(v);
		else if (!strcmp(a, "--layout"))
			split = !strcmp(v, "split");
		else if (!strcmp(a, "--work-us"))
			work_us = atoi(v);
		else if (!strcmp(a, "--stats"))
			stats_path = v;
		else if (!strcmp(a, "--fill-file"))
			fill_path = v;
		else {
			fprintf(stderr, "bench-app: unknown option %s\n", a);
			return 2;
		}
		i++;
	}
	if (mem_mib < 2 || pct < 0 || pct > 100 || work_us < 10 || (!stats_path && !fill_path)) {
		fprintf(stderr, "usage: bench-app --mem-mib N [--random-pct P] [--layout interleaved|split] "
				"[--work-us U] (--stats FILE | --fill-file PATH)\n");
		return 2;
	}
	size_t bytes = mem_mib << 20;
	bytes -= bytes % BLOCK;

	if (fill_path) {
		int fd = open(fill_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd < 0)
			die(fill_path);
		uint64_t *block = malloc(BLOCK);
		size_t nblocks = bytes / BLOCK;
		if (!block)
			die("malloc");
		for (size_t b = 0; b < nblocks; b++) {
			fill_block(block, b, block_is_random(b, nblocks, pct, split));
			for (size_t off = 0; off < BLOCK;) {
				ssize_t n = write(fd, (char *)block + off, BLOCK - off);
				if (n < 0)
					die("write");
				off += (size_t)n;
			}
		}
		if (close(fd))
			die("close");
		return 0;
	}

	int sfd = open(stats_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (sfd < 0)
		die(stats_path);
	uint8_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	fill(mem, bytes, pct, split);

	/* Calibrate: rounds of work() per iteration so that one iteration takes ~work_us. */
	long rounds = 1;
	for (;;) {
		uint64_t t0 = now_ns();
		work(rounds);
		uint64_t dt = now_ns() - t0;
		if (dt > 20000000ull || rounds > (1L << 30)) {
			rounds = (long)((double)rounds * work_us * 1000.0 / (double)dt);
			if (rounds < 1)
				rounds = 1;
			break;
		}
		rounds *= 2;
	}

	/* The stall threshold: 5x the intended iteration, at least 2 ms (scheduler noise).
	 * typ_gap follows the real iteration time outside stalls. */
	uint64_t typ_gap = (uint64_t)work_us * 1000ull;
	uint64_t threshold = typ_gap * 5 > 2000000ull ? typ_gap * 5 : 2000000ull;
	uint64_t iters = 0, max_gap = 0, sink = 0;
	size_t pages = bytes / 4096, page = 0;
	uint64_t prev = now_ns(), last_stats = 0;
	write_stats(sfd, iters, prev, work_us, mem_mib, max_gap, typ_gap);
	for (;;) {
		sink ^= work(rounds);
		((volatile uint64_t *)(mem + page * 4096))[1] = sink; /* keep the region live */
		page = (page + 4099) % pages;
		iters++;
		uint64_t t = now_ns(), gap = t - prev;
		prev = t;
		int stalled = gap > threshold;
		if (stalled) {
			stalls[nstalls % MAX_STALLS] = (struct stall){ t, gap };
			nstalls++;
		}
		if (gap > max_gap)
			max_gap = gap;
		if (!stalled)
			typ_gap = (typ_gap * 63 + gap) / 64;
		if (stalled || t - last_stats > STATS_EVERY_NS) {
			write_stats(sfd, iters, t, work_us, mem_mib, max_gap, typ_gap);
			last_stats = t;
		}
	}
}
