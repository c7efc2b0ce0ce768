/* Threads that must come back with their stacks, TLS and progress: 4 threads each keep
 * a stack array and a __thread value derived from their index and count up. At GO the
 * main thread checks that every counter still advances, then joins the threads, each of
 * which checks its own stack and TLS. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NT 4
static atomic_ulong counters[NT];
static atomic_int stop;
static __thread uint64_t tls_value;

static void *work(void *arg)
{
	uintptr_t idx = (uintptr_t)arg;
	uint64_t stack[512];
	struct timespec ts = {0, 1000000};
	int bad = 0;

	tls_value = 0xabcdef00 + idx;
	for (int i = 0; i < 512; i++)
		stack[i] = idx * 1000003u + (uint64_t)i * 7919u;
	while (!atomic_load(&stop)) {
		unsigned long c = atomic_fetch_add(&counters[idx], 1);
		if (stack[c % 512] != idx * 1000003u + (c % 512) * 7919u)
			bad = 1;
		nanosleep(&ts, NULL);
	}
	for (int i = 0; i < 512; i++)
		if (stack[i] != idx * 1000003u + (uint64_t)i * 7919u)
			bad = 1;
	if (tls_value != 0xabcdef00 + idx)
		bad = 1;
	return (void *)(uintptr_t)bad;
}

int main(void)
{
	pthread_t th[NT];
	unsigned long before[NT];
	struct timespec ts = {0, 20000000}, settle = {0, 200000000};
	int bad = 0;
	void *ret;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (uintptr_t i = 0; i < NT; i++)
		if (pthread_create(&th[i], NULL, work, (void *)i)) {
			printf("FAIL: pthread_create\n");
			return 1;
		}
	printf("READY %d threads\n", NT);
	while (access("GO", F_OK) != 0)
		nanosleep(&ts, NULL);
	for (int i = 0; i < NT; i++)
		before[i] = atomic_load(&counters[i]);
	nanosleep(&settle, NULL);
	for (int i = 0; i < NT; i++)
		if (atomic_load(&counters[i]) <= before[i]) {
			printf("FAIL: thread %d stopped counting after restore\n", i);
			bad = 1;
		}
	atomic_store(&stop, 1);
	for (int i = 0; i < NT; i++) {
		if (pthread_join(th[i], &ret) || ret) {
			printf("FAIL: thread %d lost its stack or TLS\n", i);
			bad = 1;
		}
	}
	if (!bad)
		printf("PASS: %d threads kept stacks, TLS and kept counting\n", NT);
	return bad;
}
