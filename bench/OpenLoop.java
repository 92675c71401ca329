// Offer GET requests at a fixed rate (open loop) and print the latency percentiles, each latency
// measured from the moment the request was due, not from when it was sent: a stalled server is
// charged for every request it kept waiting (no coordinated omission). wrk (closed loop) measures
// the most a server answers, and its latency at that saturation is connections / throughput;
// this measures the latency at a given rate.
//
//   java bench/OpenLoop.java <host> <port> <rate/s> <seconds> <connections> <header> <paths file>
//
// One thread and non-blocking keep-alive HTTP/1.1 connections (a load generator sharing 2 cores
// with the system it measures must cost little): request i is due at i / rate and goes out on the
// first idle connection once due (up to 1 ms early, then timed from its send: the selector
// waits in whole ms); when every connection is busy it waits, and its wait counts. The first
// second warms up and is not counted. Prints "sent", "rate", "errors", "pct <q> <microseconds>"
// (from when due) and "sent_pct <q> <microseconds>" (from when sent: on a machine without a
// spare core, the gap between the two is partly the generator's own wait for a core).
// Used by bench/reads.py.
import java.io.IOException;
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.SelectionKey;
import java.nio.channels.Selector;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayDeque;
import java.util.Arrays;
import java.util.List;

public class OpenLoop {
    static final double WARMUP_S = 1.0;
    /**
     * A request due within this much is sent now, timed from its send: the selector waits in whole
     * ms, and spinning for the rest would take a core from the system measured.
     */
    static final long EARLY_NS = 1_000_000L;

    /** One keep-alive connection with at most one request in flight. */
    static final class Conn {
        final SocketChannel channel;
        final ByteBuffer in = ByteBuffer.allocate(1 << 20);
        ByteBuffer out;
        long due = -1;
        long sent = -1;
        long index = -1;

        Conn(SocketChannel channel) {
            this.channel = channel;
        }
    }

    public static void main(String[] args) throws Exception {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        double rate = Double.parseDouble(args[2]);
        double seconds = Double.parseDouble(args[3]);
        int connections = Integer.parseInt(args[4]);
        String header = args[5];
        List<String> paths = Files.readAllLines(Path.of(args[6]));
        byte[][] requests = new byte[paths.size()][];
        for (int p = 0; p < requests.length; p++) {
            requests[p] = ("GET " + paths.get(p) + " HTTP/1.1\r\nHost: " + host + "\r\n" + header
                + "\r\n\r\n").getBytes(StandardCharsets.US_ASCII);
        }
        long total = Math.round(rate * (seconds + WARMUP_S));
        long warmup = Math.round(rate * WARMUP_S);
        long[] latencies = new long[(int) total];
        long[] served = new long[(int) total];
        long errors = 0;
        long answered = 0;

        Selector selector = Selector.open();
        ArrayDeque<Conn> idle = new ArrayDeque<>();
        for (int k = 0; k < connections; k++) {
            SocketChannel channel = SocketChannel.open(new InetSocketAddress(host, port));
            channel.socket().setTcpNoDelay(true);
            channel.configureBlocking(false);
            Conn conn = new Conn(channel);
            channel.register(selector, SelectionKey.OP_READ, conn);
            idle.add(conn);
        }
        long start = System.nanoTime() + 50_000_000L;
        long next = 0;
        while (answered < total) {
            long now = System.nanoTime();
            while (next < total && !idle.isEmpty()) {
                long due = start + Math.round(next * 1e9 / rate);
                if (due > now + EARLY_NS) {
                    break;
                }
                Conn conn = idle.poll();
                conn.due = Math.min(due, now); // sent early: timed from its send
                conn.sent = now;
                conn.index = next;
                conn.out = ByteBuffer.wrap(requests[(int) (next % requests.length)]);
                conn.channel.write(conn.out);
                if (conn.out.hasRemaining()) {
                    conn.channel.keyFor(selector).interestOps(
                        SelectionKey.OP_READ | SelectionKey.OP_WRITE);
                }
                next++;
            }
            long waitMs = 1000;
            if (next < total && !idle.isEmpty()) {
                long due = start + Math.round(next * 1e9 / rate);
                waitMs = Math.max(1, (due - EARLY_NS - System.nanoTime()) / 1_000_000);
            }
            selector.select(waitMs);
            for (SelectionKey key : selector.selectedKeys()) {
                Conn conn = (Conn) key.attachment();
                if (key.isValid() && key.isWritable()) {
                    conn.channel.write(conn.out);
                    if (!conn.out.hasRemaining()) {
                        key.interestOps(SelectionKey.OP_READ);
                    }
                }
                if (key.isValid() && key.isReadable()) {
                    if (conn.channel.read(conn.in) < 0) {
                        throw new IOException("the server closed a connection");
                    }
                    int status = complete(conn.in);
                    if (status != 0) {
                        if (status != 200) {
                            errors++;
                        }
                        long done = System.nanoTime();
                        boolean warm = conn.index < warmup;
                        latencies[(int) conn.index] = warm ? -1 : done - conn.due;
                        served[(int) conn.index] = warm ? -1 : done - conn.sent;
                        answered++;
                        conn.due = -1;
                        idle.add(conn);
                    }
                }
            }
            selector.selectedKeys().clear();
        }
        double elapsed = (System.nanoTime() - start) / 1e9;
        long[] counted = Arrays.stream(latencies).filter(v -> v >= 0).sorted().toArray();
        System.out.println("sent " + counted.length);
        System.out.printf("rate %.1f%n", total / elapsed);
        System.out.println("errors " + errors);
        long[] fromSend = Arrays.stream(served).filter(v -> v >= 0).sorted().toArray();
        for (double q : new double[] {50, 90, 99, 99.9}) {
            int at = (int) Math.min(counted.length - 1, Math.ceil(q / 100 * counted.length) - 1);
            System.out.println("pct " + q + " " + (counted.length == 0 ? 0 : counted[at] / 1000));
            System.out.println("sent_pct " + q + " " + (counted.length == 0 ? 0 : fromSend[at] / 1000));
        }
    }

    /**
     * If `in` holds a whole response (headers and Content-Length body), consume it and return its
     * status; else return 0 and keep reading.
     */
    static int complete(ByteBuffer in) {
        byte[] data = in.array();
        int end = in.position();
        int headersEnd = -1;
        int length = 0;
        int line = 0;
        for (int i = 1; i < end; i++) {
            if (data[i] != '\n' || data[i - 1] != '\r') {
                continue;
            }
            if (i - 1 == line) {
                headersEnd = i + 1;
                break;
            }
            if (startsWithIgnoreCase(data, line, i - 1, CONTENT_LENGTH)) {
                length = 0;
                for (int j = line + CONTENT_LENGTH.length; j < i - 1; j++) {
                    if (data[j] >= '0' && data[j] <= '9') {
                        length = length * 10 + (data[j] - '0');
                    }
                }
            }
            line = i + 1;
        }
        if (headersEnd < 0 || end < headersEnd + length) {
            return 0;
        }
        int status = (data[9] - '0') * 100 + (data[10] - '0') * 10 + (data[11] - '0');
        int rest = end - headersEnd - length;
        System.arraycopy(data, headersEnd + length, data, 0, rest);
        in.position(rest);
        return status;
    }

    static final byte[] CONTENT_LENGTH = "content-length:".getBytes(StandardCharsets.US_ASCII);

    static boolean startsWithIgnoreCase(byte[] data, int from, int to, byte[] prefix) {
        if (to - from < prefix.length) {
            return false;
        }
        for (int k = 0; k < prefix.length; k++) {
            if (Character.toLowerCase(data[from + k]) != prefix[k]) {
                return false;
            }
        }
        return true;
    }
}
