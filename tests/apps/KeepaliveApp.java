// A server and a client connected to it, both idle: the Java application of tests/test_apps.py.
// Arguments: PORT [IDLE INTVL CNT]. With the three values, both sockets turn keepalive on
// (setKeepAlive(true)) and set jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE/INTERVAL/COUNT.
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import jdk.net.ExtendedSocketOptions;

public class KeepaliveApp {
    static void tune(Socket s, String[] a) throws Exception {
        if (a.length < 4) return;
        s.setKeepAlive(true);
        s.setOption(ExtendedSocketOptions.TCP_KEEPIDLE, Integer.parseInt(a[1]));
        s.setOption(ExtendedSocketOptions.TCP_KEEPINTERVAL, Integer.parseInt(a[2]));
        s.setOption(ExtendedSocketOptions.TCP_KEEPCOUNT, Integer.parseInt(a[3]));
    }

    public static void main(String[] a) throws Exception {
        ServerSocket server = new ServerSocket();
        server.bind(new InetSocketAddress("127.0.0.1", Integer.parseInt(a[0])));
        Socket client = new Socket();
        tune(client, a);
        client.connect(server.getLocalSocketAddress());
        Socket accepted = server.accept();
        tune(accepted, a);
        System.out.println(client.getLocalPort());
        System.out.flush();
        Thread.sleep(Long.MAX_VALUE);
    }
}
