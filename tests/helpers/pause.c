/*
 * The tests' pause program: the init process of a CRI pod sandbox.
 *
 * It holds the pod's namespaces open by staying alive, reaps every child that
 * is reparented to it (it is pid 1 of the sandbox's pid namespace), and exits
 * 0 on SIGTERM or SIGINT, which is how containerd stops a sandbox. Built with
 * `gcc -static` by tests/helpers/pause.py, so the image needs no libc.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>

static volatile sig_atomic_t stopping;

static void on_stop(int sig)
{
	(void)sig;
	stopping = 1;
}

static void on_child(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(void)
{
	struct sigaction stop = {.sa_handler = on_stop};
	struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP};
	sigset_t blocked, waiting;

	sigemptyset(&stop.sa_mask);
	sigemptyset(&child.sa_mask);
	if (sigaction(SIGTERM, &stop, NULL) || sigaction(SIGINT, &stop, NULL) ||
	    sigaction(SIGCHLD, &child, NULL))
		return 1;
	/* Block the signals between the check and the wait, so none is lost. */
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGTERM);
	sigaddset(&blocked, SIGINT);
	sigaddset(&blocked, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &blocked, &waiting))
		return 1;
	while (!stopping)
		sigsuspend(&waiting);
	return 0;
}
