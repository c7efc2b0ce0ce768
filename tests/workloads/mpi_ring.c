/* Self-checking MPI job: ranks pass values around a ring, STEPS times, one step every
 * DELAY_MS milliseconds.
 *
 *     mpi_ring STEPS DELAY_MS LOG
 *
 * Each step every rank sends its value to the next rank and mixes in the one it receives
 * from the previous rank, so the result depends on every message of every step having
 * arrived exactly once, in order. Rank 0 appends each step number to LOG (O_APPEND) and
 * at the end prints `result=<hex> ranks=<n> steps=<n>`; every rank prints the node it
 * ran on (`rank R of N on NODE`). tests/workloads/mpi_ring.py computes the expected result.
 */
#include <fcntl.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    int rank, size, fd = -1;
    MPI_Init(&argc, &argv);
    if (argc != 4) {
        fprintf(stderr, "usage: mpi_ring STEPS DELAY_MS LOG\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    long steps = atol(argv[1]), delay_ms = atol(argv[2]);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *node = getenv("SLURMD_NODENAME");
    printf("rank %d of %d on %s\n", rank, size, node ? node : "?");
    fflush(stdout);
    if (rank == 0 && (fd = open(argv[3], O_WRONLY | O_APPEND | O_CREAT, 0644)) < 0) {
        perror(argv[3]);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    uint64_t value = mix((uint64_t)rank + 1), left;
    int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    for (long step = 1; step <= steps; step++) {
        MPI_Sendrecv(&value, 1, MPI_UINT64_T, next, 0, &left, 1, MPI_UINT64_T, prev, 0,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        value = mix(value ^ (left + (uint64_t)step));
        if (fd >= 0) {
            char line[32];
            int n = snprintf(line, sizeof line, "%ld\n", step);
            if (write(fd, line, n) != n)
                MPI_Abort(MPI_COMM_WORLD, 2);
        }
        usleep(delay_ms * 1000);
    }
    uint64_t *all = malloc(sizeof(uint64_t) * size), result = 0;
    MPI_Gather(&value, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (int r = 0; r < size; r++)
            result = mix(result ^ all[r]);
        printf("result=%016llx ranks=%d steps=%ld\n", (unsigned long long)result, size, steps);
        fflush(stdout);
    }
    free(all);
    MPI_Finalize();
    return 0;
}
