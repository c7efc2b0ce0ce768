/* A compiled counter that must go on across checkpoint/restore without gap or repeat.
 * Appends 1, 2, 3... to counter.log (O_APPEND, opened once) every 5 ms; at GO reads the
 * file back: it must be exactly 1..n. argv[1]: exit code on PASS. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int code = argc > 1 ? atoi(argv[1]) : 0;
	int fd = open("counter.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
	struct timespec ts = {0, 5000000};
	unsigned long n = 0, expect = 0, v;
	char buf[32];
	FILE *f;
	int len, ok = 1;

	if (fd < 0) {
		printf("FAIL: open counter.log\n");
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (;;) {
		n++;
		len = snprintf(buf, sizeof(buf), "%lu\n", n);
		if (write(fd, buf, len) != len) {
			printf("FAIL: write\n");
			return 1;
		}
		if (n == 20)
			printf("READY pid=%d\n", (int)getpid());
		if (n > 20 && access("GO", F_OK) == 0)
			break;
		nanosleep(&ts, NULL);
	}
	close(fd);
	f = fopen("counter.log", "r");
	if (!f) {
		printf("FAIL: reopen\n");
		return 1;
	}
	while (fscanf(f, "%lu", &v) == 1)
		if (v != ++expect)
			ok = 0;
	fclose(f);
	if (expect != n)
		ok = 0;
	printf("%s: counter reached %lu, log has %lu lines\n", ok ? "PASS" : "FAIL", n, expect);
	return ok ? code : 1;
}
