# clean_exec CMD...: exec CMD with every fd above 2 closed, so that the
# process holds only what ferry can checkpoint (a shell or terminal often
# leaves inherited pipes open in its children).
clean_exec() {
    local fd
    for fd in $(ls /proc/$BASHPID/fd); do
        if [ "$fd" -gt 2 ]; then
            eval "exec $fd>&-" 2>/dev/null || true
        fi
    done
    exec "$@"
}
