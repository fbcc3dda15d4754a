/*
 * cuda-checkpoint, as CRIU's cuda plugin runs it in images built by fvbuild.
 *
 * Forwards the call to fvboot's cuda-checkpoint service (cuda_checkpoint_service.py: one
 * process with the CUDA driver already initialised) and prints its answer. With no service
 * listening at $FV_CUDA_CHECKPOINT_SOCKET, it runs the full tool instead
 * ($FV_CUDA_CHECKPOINT_FALLBACK, or FALLBACK below). Same protocol as the reference client,
 * cuda_checkpoint_client.py:
 *   request  "FVCC1 <argc>\n", then the arguments and then KEY=VALUE entries, each
 *            NUL-terminated; then the writing side is shut down.
 *   reply    "<exit code> <stdout bytes> <stderr bytes>\n", stdout, stderr.
 * Why C: the plugin starts this 5-10 times per restore, and a Python start costs ~40 ms.
 * Bounded: a service that stops answering ends the call after $FV_CUDA_CHECKPOINT_TIMEOUT_S
 * (default TIMEOUT_S) with an error, never a hang of the restore.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef FALLBACK
#define FALLBACK "/usr/local/libexec/fv-cuda-checkpoint"
#endif

#ifndef TIMEOUT_S
#define TIMEOUT_S 300
#endif

static const char *const forwarded_env[] = { "FV_CUDA_DEVICE_MAP", NULL };

/* Whole buffer to FD; a socket whose peer is gone is an error here, not a SIGPIPE. */
static int write_all(int fd, const char *buf, size_t n, int sock)
{
	while (n) {
		ssize_t w = sock ? send(fd, buf, n, MSG_NOSIGNAL) : write(fd, buf, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

static int run_fallback(char **argv)
{
	const char *tool = getenv("FV_CUDA_CHECKPOINT_FALLBACK");

	if (!tool || !*tool)
		tool = FALLBACK;
	argv[0] = (char *)tool;
	execv(tool, argv);
	fprintf(stderr, "fv-cuda-checkpoint: cannot run %s: %s\n", tool, strerror(errno));
	return 1;
}

static int send_request(int fd, int argc, char **argv)
{
	char head[32];

	snprintf(head, sizeof(head), "FVCC1 %d\n", argc - 1);
	if (write_all(fd, head, strlen(head), 1))
		return -1;
	for (int i = 1; i < argc; i++)
		if (write_all(fd, argv[i], strlen(argv[i]) + 1, 1))
			return -1;
	for (const char *const *key = forwarded_env; *key; key++) {
		const char *value = getenv(*key);

		if (!value)
			continue;
		if (write_all(fd, *key, strlen(*key), 1) || write_all(fd, "=", 1, 1) ||
		    write_all(fd, value, strlen(value) + 1, 1))
			return -1;
	}
	return shutdown(fd, SHUT_WR);
}

/* The whole reply, NUL-terminated; NULL on a read error. */
static char *read_reply(int fd, size_t *len)
{
	size_t cap = 4096;
	char *buf = malloc(cap);

	*len = 0;
	while (buf) {
		ssize_t r;

		if (*len + 1 >= cap) {
			char *bigger = realloc(buf, cap * 2);

			if (!bigger)
				break;
			buf = bigger;
			cap *= 2;
		}
		r = read(fd, buf + *len, cap - *len - 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			break;
		if (r == 0) {
			buf[*len] = '\0';
			return buf;
		}
		*len += (size_t)r;
	}
	free(buf);
	return NULL;
}

/* Send and receive timeouts on FD, so a service that stops answering cannot hang us. */
static double set_timeouts(int fd)
{
	/* seconds as fvboot's settings take them, fractions and exponents too ("0.5", "1e3") */
	const char *env = getenv("FV_CUDA_CHECKPOINT_TIMEOUT_S");
	double seconds = env && *env ? strtod(env, NULL) : TIMEOUT_S;
	struct timeval tv;

	if (!(seconds > 0) || seconds > 604800)
		seconds = TIMEOUT_S;
	tv.tv_sec = (time_t)seconds;
	tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
	if (tv.tv_sec == 0 && tv.tv_usec == 0)
		tv.tv_usec = 1; /* zero would mean no bound at all */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) ||
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)))
		return -1;
	return seconds;
}

int main(int argc, char **argv)
{
	const char *path = getenv("FV_CUDA_CHECKPOINT_SOCKET");
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	unsigned long n_out, n_err;
	size_t len;
	char *reply, *body;
	double timeout;
	int fd, rc, err;

	if (!path || !*path || strlen(path) >= sizeof(addr.sun_path))
		return run_fallback(argv);
	strcpy(addr.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return run_fallback(argv);
	timeout = set_timeouts(fd); /* before connect: a full backlog must not block us either */
	if (timeout < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr))) {
		close(fd);
		return run_fallback(argv);
	}
	/* From here on the request may reach the driver: never run it a second time. */
	reply = send_request(fd, argc, argv) ? NULL : read_reply(fd, &len);
	err = errno;
	close(fd);
	body = reply ? strchr(reply, '\n') : NULL;
	if (!body || sscanf(reply, "%d %lu %lu", &rc, &n_out, &n_err) != 3 ||
	    (size_t)(reply + len - body - 1) != n_out + n_err) {
		if (reply)
			fprintf(stderr, "fv-cuda-checkpoint: the cuda-checkpoint service at %s failed: malformed reply\n", path);
		else if (err == EAGAIN || err == EWOULDBLOCK)
			fprintf(stderr, "fv-cuda-checkpoint: the cuda-checkpoint service at %s failed: no answer within %g s\n",
				path, timeout);
		else
			fprintf(stderr, "fv-cuda-checkpoint: the cuda-checkpoint service at %s failed: %s\n", path,
				strerror(err));
		free(reply);
		return 1;
	}
	body++;
	if (write_all(STDOUT_FILENO, body, n_out, 0) || write_all(STDERR_FILENO, body + n_out, n_err, 0))
		rc = rc ? rc : 1;
	free(reply);
	return rc;
}
